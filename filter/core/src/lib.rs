//! `dialguard-filter-core`: everything the dialguard filter decides, with no
//! proxy-wasm dependency. The wasm crate (`filter/wasm`) implements the small
//! host traits here ([`ConnectionFacts`], [`NodeFacts`]) with Envoy hostcalls and
//! forwards its callbacks; all logic (configuration, verdicts, the outbox of
//! events awaiting acknowledgement) lives here and is unit-tested natively.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod addr;
mod config;
mod heartbeat;
mod identity;
mod metadata;
mod outbox;
mod upstreams;
mod verdict;

pub use addr::{AddrParseError, OrigDst, UpstreamHost, parse_envoy_address};
pub use config::{AllowRule, Cidr, CollectorConfig, ConfigError, FilterConfig, Mode};
pub use heartbeat::{HeartbeatClock, Tally};
pub use identity::{NodeFacts, hello};
pub use metadata::MetadataCache;
pub use outbox::{Outbox, OutboxLimits};
pub use upstreams::UpstreamMemory;
pub use verdict::{ConnectionFacts, JudgePoint, Judgement, Outcome, judge};

pub use dialguard_proto::v1::{Build, Verdict};
