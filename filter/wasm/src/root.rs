//! One root context: a filter configuration, checked. Connections are
//! judged against the configuration of the root they were created under;
//! everything that must outlive a configuration lives in
//! [`crate::reporter`].

use dialguard_filter_core::{FilterConfig, Mode};

use crate::abi::{self, Buffer, LogLevel};

/// Open connections are judged on the root's timer at least this often, so
/// a misroute is reported well within a second of its connect even when
/// events are flushed less often.
const MAX_JUDGE_PERIOD_MS: u64 = 200;

/// A configured root. A root whose configuration was refused never becomes one.
#[derive(Debug)]
pub struct Root {
    pub config: FilterConfig,
}

impl Root {
    /// Reads and checks the plugin configuration; on error logs one line naming
    /// the field, so Envoy refuses the filter.
    pub fn configure() -> Option<Self> {
        let bytes = abi::buffer(Buffer::PluginConfiguration, usize::MAX).unwrap_or_default();
        let config = match FilterConfig::from_json(&bytes) {
            Ok(config) => config,
            Err(err) => {
                abi::log(LogLevel::Error, &err.to_string());
                return None;
            }
        };
        if config.mode == Mode::Enforce && !cfg!(feature = "enforce") {
            abi::log(
                LogLevel::Error,
                "invalid dialguard configuration at `mode`: enforce needs the module built with \
                 enforcement (dialguard_filter_enforce.wasm); this module only audits",
            );
            return None;
        }
        let tick_ms = config.collector.flush_interval_ms.min(MAX_JUDGE_PERIOD_MS);
        let _ = abi::set_tick_period_ms(u32::try_from(tick_ms).unwrap_or(u32::MAX));
        Some(Self { config })
    }
}
