//! Which rows a report covers: a time window that a row's connections must
//! overlap, and exact matches on source namespace, verdict and destination
//! port; and which page of them (`limit`, `cursor`: see [`super::page`]).
//! The same text arrives as `report` flags and as query parameters of
//! `GET /api/v1/report`, so both are validated here, with errors naming the
//! parameter and what it expects.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::Value;
use serde::{Deserialize, Serialize};

use super::page::{DEFAULT_LIMIT, Page};

/// The verdicts a report can hold (the filter reports only these).
pub const VERDICTS: [&str; 3] = ["misrouted", "blackholed", "redirected"];

/// The filters as given, not yet validated: flags or query parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterArgs {
    pub since: Option<String>,
    pub until: Option<String>,
    pub namespace: Option<String>,
    pub verdict: Option<String>,
    pub port: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// A validated filter; the default selects every row, and its first page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportFilter {
    /// Rows whose last connection ended at or after this (ns since the epoch).
    pub since_ns: Option<u64>,
    /// Rows whose first connection ended at or before this.
    pub until_ns: Option<u64>,
    /// The source workload's namespace, exactly.
    pub namespace: Option<String>,
    /// One of [`VERDICTS`].
    pub verdict: Option<String>,
    /// The port of the dialed address.
    pub port: Option<u16>,
    /// Which of the selected rows, worst first.
    pub page: Page,
}

/// The filter a report was made with, as it appears in the report (times
/// resolved to RFC 3339, so "24h" shows which instant it meant).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl AppliedFilter {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A filter value that cannot be used. `Display` names the parameter bare
/// (`verdict "foo": ...`), as the HTTP API does; [`FilterError::flag_message`]
/// names it as the command-line flag (`--verdict "foo": ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("{parameter} {value:?}: expected {expected}")]
    Invalid {
        parameter: &'static str,
        value: String,
        expected: String,
    },
    #[error(
        "unknown parameter {0:?}: expected since, until, namespace, verdict, port, limit or cursor"
    )]
    Unknown(String),
    #[error("{0} given more than once")]
    Repeated(&'static str),
}

impl FilterError {
    /// The parameter at fault.
    pub fn parameter(&self) -> &str {
        match self {
            Self::Invalid { parameter, .. } | Self::Repeated(parameter) => parameter,
            Self::Unknown(name) => name,
        }
    }

    /// The message with the parameter written as a flag.
    pub fn flag_message(&self) -> String {
        format!("--{self}")
    }
}

const TIME_EXPECTED: &str = "an RFC 3339 time such as 2026-11-26T07:00:00Z, \
    or a duration such as 24h or 7d (meaning that long ago)";

impl FilterArgs {
    /// Reads a URL query string (`since=24h&verdict=misrouted`); unknown and
    /// repeated parameters are refused, so that a typo does not silently
    /// widen the report.
    pub fn from_query(query: &str) -> Result<Self, FilterError> {
        let mut args = Self::default();
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let (parameter, slot) = match name.as_ref() {
                "since" => ("since", &mut args.since),
                "until" => ("until", &mut args.until),
                "namespace" => ("namespace", &mut args.namespace),
                "verdict" => ("verdict", &mut args.verdict),
                "port" => ("port", &mut args.port),
                "limit" => ("limit", &mut args.limit),
                "cursor" => ("cursor", &mut args.cursor),
                other => return Err(FilterError::Unknown(other.to_string())),
            };
            if slot.replace(value.into_owned()).is_some() {
                return Err(FilterError::Repeated(parameter));
            }
        }
        Ok(args)
    }

    /// Validates every value; relative times count back from `now`.
    pub fn resolve(&self, now: SystemTime) -> Result<ReportFilter, FilterError> {
        let since_ns = self
            .since
            .as_deref()
            .map(|text| parse_time("since", text, now))
            .transpose()?;
        let until_ns = self
            .until
            .as_deref()
            .map(|text| parse_time("until", text, now))
            .transpose()?;
        if let (Some(since), Some(until)) = (since_ns, until_ns) {
            if since > until {
                return Err(FilterError::Invalid {
                    parameter: "since",
                    value: self.since.clone().unwrap_or_default(),
                    expected: format!("a time no later than until ({})", format_time_ns(until)),
                });
            }
        }
        let namespace = match self.namespace.as_deref() {
            Some("") => {
                return Err(FilterError::Invalid {
                    parameter: "namespace",
                    value: String::new(),
                    expected: "a namespace name".into(),
                });
            }
            other => other.map(str::to_string),
        };
        let verdict = self
            .verdict
            .as_deref()
            .map(|text| {
                let lower = text.to_ascii_lowercase();
                if VERDICTS.contains(&lower.as_str()) {
                    Ok(lower)
                } else {
                    Err(FilterError::Invalid {
                        parameter: "verdict",
                        value: text.to_string(),
                        expected: "misrouted, blackholed or redirected".into(),
                    })
                }
            })
            .transpose()?;
        let port = self
            .port
            .as_deref()
            .map(|text| match text.parse::<u16>() {
                Ok(port) if port != 0 => Ok(port),
                _ => Err(FilterError::Invalid {
                    parameter: "port",
                    value: text.to_string(),
                    expected: "a port number from 1 to 65535".into(),
                }),
            })
            .transpose()?;
        let page = Page::parse(self.limit.as_deref(), self.cursor.as_deref())?;
        Ok(ReportFilter {
            since_ns,
            until_ns,
            namespace,
            verdict,
            port,
            page,
        })
    }
}

impl ReportFilter {
    /// The SQL condition over `aggregates` (always valid after `WHERE`) and
    /// its parameters. The window keeps rows that overlap it: a row's
    /// counts are its whole aggregate, never cut at the window's edges.
    pub fn sql_condition(&self) -> (String, Vec<Value>) {
        let mut conditions = vec!["1".to_string()];
        let mut values = Vec::new();
        if let Some(since) = self.since_ns {
            conditions.push("last_seen_ns >= ?".into());
            values.push(Value::Integer(sql_time(since)));
        }
        if let Some(until) = self.until_ns {
            conditions.push("first_seen_ns <= ?".into());
            values.push(Value::Integer(sql_time(until)));
        }
        if let Some(namespace) = &self.namespace {
            conditions.push("source_namespace = ?".into());
            values.push(Value::Text(namespace.clone()));
        }
        if let Some(verdict) = &self.verdict {
            conditions.push("verdict = ?".into());
            values.push(Value::Text(verdict.clone()));
        }
        if let Some(port) = self.port {
            // "ip:port" and "[ipv6]:port" both end in ":port"; digits hold no
            // LIKE wildcards.
            conditions.push("original_destination LIKE ?".into());
            values.push(Value::Text(format!("%:{port}")));
        }
        (conditions.join(" AND "), values)
    }

    /// As shown in the report, and as sent to a collector by `--server`
    /// (absolute times, so the collector's clock does not shift the window).
    pub fn applied(&self) -> AppliedFilter {
        AppliedFilter {
            since: self.since_ns.map(format_time_ns),
            until: self.until_ns.map(format_time_ns),
            namespace: self.namespace.clone(),
            verdict: self.verdict.clone(),
            port: self.port,
        }
    }

    /// The query string for `GET /api/v1/report` ("" when unfiltered and
    /// on the first page of the default size: a collector from before
    /// paging then answers as well).
    pub fn to_query(&self) -> String {
        let applied = self.applied();
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        let port = applied.port.map(|port| port.to_string());
        let limit = (self.page.limit != DEFAULT_LIMIT).then(|| self.page.limit.to_string());
        let cursor = self.page.after.as_ref().map(|cursor| cursor.encode());
        for (name, value) in [
            ("since", applied.since.as_deref()),
            ("until", applied.until.as_deref()),
            ("namespace", applied.namespace.as_deref()),
            ("verdict", applied.verdict.as_deref()),
            ("port", port.as_deref()),
            ("limit", limit.as_deref()),
            ("cursor", cursor.as_deref()),
        ] {
            if let Some(value) = value {
                query.append_pair(name, value);
            }
        }
        query.finish()
    }
}

/// Nanoseconds fit SQLite's signed integers until 2262; later is "forever".
fn sql_time(ns: u64) -> i64 {
    i64::try_from(ns).unwrap_or(i64::MAX)
}

/// RFC 3339 in UTC: milliseconds, or nanoseconds when the time has them (so
/// that parsing it back gives the same instant).
pub fn format_time_ns(ns: u64) -> String {
    let time = UNIX_EPOCH + Duration::from_nanos(ns);
    if ns % 1_000_000 == 0 {
        humantime::format_rfc3339_millis(time).to_string()
    } else {
        humantime::format_rfc3339_nanos(time).to_string()
    }
}

/// An RFC 3339 time, or a duration meaning that long before `now` (to the
/// millisecond).
fn parse_time(parameter: &'static str, text: &str, now: SystemTime) -> Result<u64, FilterError> {
    let invalid = |expected: &str| FilterError::Invalid {
        parameter,
        value: text.to_string(),
        expected: expected.to_string(),
    };
    let time = match humantime::parse_duration(text.trim()) {
        Ok(ago) => {
            let now_ms = now
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
                .try_into()
                .unwrap_or(u64::MAX);
            UNIX_EPOCH
                .checked_add(Duration::from_millis(now_ms))
                .and_then(|now| now.checked_sub(ago))
                .filter(|time| *time >= UNIX_EPOCH)
                .ok_or_else(|| invalid("a duration that reaches back no further than 1970"))?
        }
        Err(_) => parse_rfc3339(text.trim()).ok_or_else(|| invalid(TIME_EXPECTED))?,
    };
    time.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .ok_or_else(|| invalid("a time between 1970 and 2554"))
}

/// RFC 3339 with any UTC offset (`Z`, `+00:00`, `+02:00`, `-05:30`);
/// humantime itself reads only UTC.
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let bytes = text.as_bytes();
    // Checked on bytes: the text is arbitrary input, and slicing a str inside
    // a multi-byte character would panic.
    let offset = bytes.len().checked_sub(6).map(|start| &bytes[start..]);
    let has_offset = offset.is_some_and(|offset| {
        matches!(offset[0], b'+' | b'-')
            && offset[3] == b':'
            && [1, 2, 4, 5].iter().all(|&i| offset[i].is_ascii_digit())
    });
    let Some(offset) = offset.filter(|_| has_offset) else {
        return humantime::parse_rfc3339(text).ok();
    };
    let digits = |high: u8, low: u8| u64::from(high - b'0') * 10 + u64::from(low - b'0');
    let (hours, minutes) = (digits(offset[1], offset[2]), digits(offset[4], offset[5]));
    // All six offset bytes are ASCII, so this is a character boundary.
    let offset_start = bytes.len() - 6;
    if hours > 23 || minutes > 59 {
        return None;
    }
    let local = humantime::parse_rfc3339(&format!("{}Z", &text[..offset_start])).ok()?;
    let shift = Duration::from_secs(hours * 3600 + minutes * 60);
    // Local time = UTC + offset, so UTC = local - offset.
    if offset[0] == b'+' {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).expect("test time")
    }

    fn ns(text: &str) -> u64 {
        at(text)
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos() as u64
    }

    fn resolve(args: FilterArgs) -> Result<ReportFilter, FilterError> {
        args.resolve(at("2026-12-01T12:00:00Z"))
    }

    #[test]
    fn relative_times_count_back_from_now() {
        let filter = resolve(FilterArgs {
            since: Some("24h".into()),
            until: Some("30m".into()),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(filter.since_ns, Some(ns("2026-11-30T12:00:00Z")));
        assert_eq!(filter.until_ns, Some(ns("2026-12-01T11:30:00Z")));
        let week = resolve(FilterArgs {
            since: Some("7d".into()),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(week.since_ns, Some(ns("2026-11-24T12:00:00Z")));
    }

    #[test]
    fn absolute_times_accept_any_offset() {
        for (text, utc) in [
            ("2026-11-26T07:00:00Z", "2026-11-26T07:00:00Z"),
            ("2026-11-26T07:00:00.250Z", "2026-11-26T07:00:00.250Z"),
            ("2026-11-26T09:00:00+02:00", "2026-11-26T07:00:00Z"),
            ("2026-11-26T01:30:00-05:30", "2026-11-26T07:00:00Z"),
            ("2026-11-26T07:00:00+00:00", "2026-11-26T07:00:00Z"),
        ] {
            let filter = resolve(FilterArgs {
                since: Some(text.into()),
                ..Default::default()
            })
            .unwrap_or_else(|err| panic!("{text}: {err}"));
            assert_eq!(filter.since_ns, Some(ns(utc)), "{text}");
        }
    }

    #[test]
    fn bad_values_name_the_parameter_and_what_it_expects() {
        let cases = [
            (
                FilterArgs {
                    verdict: Some("foo".into()),
                    ..Default::default()
                },
                "--verdict \"foo\": expected misrouted, blackholed or redirected",
            ),
            (
                FilterArgs {
                    port: Some("70000".into()),
                    ..Default::default()
                },
                "--port \"70000\": expected a port number from 1 to 65535",
            ),
            (
                FilterArgs {
                    port: Some("0".into()),
                    ..Default::default()
                },
                "--port \"0\": expected a port number from 1 to 65535",
            ),
            (
                FilterArgs {
                    since: Some("yesterday".into()),
                    ..Default::default()
                },
                "--since \"yesterday\": expected an RFC 3339 time",
            ),
            (
                FilterArgs {
                    until: Some("2026-13-01T00:00:00Z".into()),
                    ..Default::default()
                },
                "--until \"2026-13-01T00:00:00Z\": expected an RFC 3339 time",
            ),
            (
                FilterArgs {
                    since: Some("1h".into()),
                    until: Some("2h".into()),
                    ..Default::default()
                },
                "--since \"1h\": expected a time no later than until (2026-12-01T10:00:00.000Z)",
            ),
            (
                FilterArgs {
                    namespace: Some(String::new()),
                    ..Default::default()
                },
                "--namespace \"\": expected a namespace name",
            ),
            (
                FilterArgs {
                    since: Some("100000d".into()),
                    ..Default::default()
                },
                "--since \"100000d\": expected a duration that reaches back no further than 1970",
            ),
        ];
        for (args, expected) in cases {
            let err = resolve(args).expect_err(expected);
            assert!(
                err.flag_message().starts_with(expected),
                "{:?} does not start with {expected:?}",
                err.flag_message()
            );
        }
    }

    #[test]
    fn odd_input_is_refused_without_panicking() {
        for text in [
            "",
            "é",
            "2026-11-26T07:00:00Zéé",
            "ééééééé",
            "+01:00",
            "x+25:00",
            "🦀🦀",
        ] {
            for make in [
                |t: &str| FilterArgs {
                    since: Some(t.into()),
                    ..Default::default()
                },
                |t: &str| FilterArgs {
                    port: Some(t.into()),
                    ..Default::default()
                },
                |t: &str| FilterArgs {
                    verdict: Some(t.into()),
                    ..Default::default()
                },
            ] {
                assert!(resolve(make(text)).is_err(), "{text:?}");
            }
        }
        assert!(FilterArgs::from_query("%FF=%FE&since=%00").is_err());
    }

    #[test]
    fn verdicts_are_case_insensitive() {
        let filter = resolve(FilterArgs {
            verdict: Some("MISROUTED".into()),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(filter.verdict.as_deref(), Some("misrouted"));
    }

    #[test]
    fn query_strings_round_trip_and_refuse_unknown_or_repeated_parameters() {
        let filter = resolve(FilterArgs {
            since: Some("2026-11-26T07:00:00.123456789Z".into()),
            until: Some("1h".into()),
            namespace: Some("team a&b".into()),
            verdict: Some("blackholed".into()),
            port: Some("5701".into()),
            limit: Some("25".into()),
            cursor: None,
        })
        .expect("valid");
        let query = filter.to_query();
        let back = FilterArgs::from_query(&query)
            .expect("parse")
            .resolve(at("2030-01-01T00:00:00Z"))
            .expect("valid");
        assert_eq!(back, filter, "{query}");
        assert_eq!(ReportFilter::default().to_query(), "");

        assert_eq!(
            FilterArgs::from_query("verdit=misrouted").expect_err("typo"),
            FilterError::Unknown("verdit".into())
        );
        assert_eq!(
            FilterArgs::from_query("port=1&port=2").expect_err("repeated"),
            FilterError::Repeated("port")
        );
    }

    #[test]
    fn the_condition_binds_one_value_per_placeholder() {
        let filter = resolve(FilterArgs {
            since: Some("1h".into()),
            until: Some("0s".into()),
            namespace: Some("manager".into()),
            verdict: Some("misrouted".into()),
            port: Some("5701".into()),
            ..Default::default()
        })
        .expect("valid");
        let (sql, values) = filter.sql_condition();
        assert_eq!(sql.matches('?').count(), values.len());
        assert_eq!(values.last(), Some(&Value::Text("%:5701".into())));
        assert_eq!(
            ReportFilter::default().sql_condition(),
            ("1".into(), vec![])
        );
    }
}
