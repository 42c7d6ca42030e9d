//! Which page of the report's rows: at most `limit` rows, worst first,
//! after the row that a cursor names.
//!
//! A cursor, not an offset: an offset makes SQLite produce and throw away
//! every earlier row (its sorter then holds offset + limit rows, so a deep
//! page costs memory in proportion to its depth), and rows stored between
//! two requests would shift an offset's pages. A cursor holds the last
//! row's place in the order (its severity, count and key), and the next
//! page is the rows after it: each page is one bounded scan, and no row is
//! shown twice. A row whose count grows between two pages moves up in the
//! order; if it moves from after the cursor to before it, the walk misses
//! it (each page reflects the database when it is read).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rusqlite::types::Value;
use serde::{Deserialize, Serialize};

use super::filter::FilterError;

/// Rows per page when no limit is given.
pub const DEFAULT_LIMIT: usize = 1_000;
/// Most rows a page may ask for: the rows of a page are held in memory
/// while it is made (about 3 KB each with their texts, JSON included).
pub const MAX_LIMIT: usize = 10_000;

/// Worst first: misrouted, then blackholed, then the rest (redirected).
const SEVERITY: &str = "CASE verdict WHEN 'misrouted' THEN 0 WHEN 'blackholed' THEN 1 ELSE 2 END";

/// The order of the rows, as the columns that make a cursor: severity,
/// count descending, then the key (dialed address first) so that the order
/// is total and a cursor names exactly one place in it.
const ORDER_KEY: &str = "original_destination, source_namespace, source_workload, upstream_host, \
     cluster, verdict";

/// `SELECT`s this after a query's own columns; [`Cursor::read`] reads them back.
pub fn order_columns() -> String {
    format!("{SEVERITY}, count, {ORDER_KEY}")
}

/// The `ORDER BY` of the report's rows.
pub fn order_by() -> String {
    format!("{SEVERITY}, -count, {ORDER_KEY}")
}

/// A page: how many rows and after which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub limit: usize,
    pub after: Option<Cursor>,
}

impl Default for Page {
    fn default() -> Self {
        Self {
            limit: DEFAULT_LIMIT,
            after: None,
        }
    }
}

impl Page {
    /// `limit` and `cursor` as given (flags or query parameters).
    pub fn parse(limit: Option<&str>, cursor: Option<&str>) -> Result<Self, FilterError> {
        let limit = match limit {
            None => DEFAULT_LIMIT,
            Some(text) => match text.trim().parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(FilterError::Invalid {
                        parameter: "limit",
                        value: text.to_string(),
                        expected: format!("a number of rows from 1 to {MAX_LIMIT}"),
                    });
                }
            },
        };
        let after = cursor.map(Cursor::decode).transpose()?;
        Ok(Self { limit, after })
    }

    /// The SQL condition that keeps the rows after the cursor (always
    /// valid after `AND`) and its parameters.
    pub fn sql_after(&self) -> (String, Vec<Value>) {
        let Some(cursor) = &self.after else {
            return ("1".into(), Vec::new());
        };
        let Cursor(severity, count, key) = cursor;
        let mut values = vec![Value::Integer(*severity), Value::Integer(-count)];
        values.extend(key.iter().cloned().map(Value::Text));
        (
            format!("({SEVERITY}, -count, {ORDER_KEY}) > (?, ?, ?, ?, ?, ?, ?, ?)"),
            values,
        )
    }
}

/// A row's place in the order: severity, count and key, as
/// `base64url(JSON)` to the outside (opaque: only its own `nextCursor` is
/// meant to come back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor(i64, i64, [String; 6]);

const CURSOR_EXPECTED: &str = "the nextCursor of an earlier page of the report";

impl Cursor {
    /// Reads the [`order_columns`] selected from column `first` on.
    pub fn read(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Self> {
        let text = |offset: usize| row.get::<_, String>(first + offset);
        Ok(Self(
            row.get(first)?,
            row.get(first + 1)?,
            [text(2)?, text(3)?, text(4)?, text(5)?, text(6)?, text(7)?],
        ))
    }

    pub fn encode(&self) -> String {
        // A tuple of integers and strings always serializes.
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(text: &str) -> Result<Self, FilterError> {
        let invalid = || FilterError::Invalid {
            parameter: "cursor",
            value: text.chars().take(80).collect(),
            expected: CURSOR_EXPECTED.into(),
        };
        let bytes = URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| invalid())?;
        let cursor: Self = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        if !(0..=2).contains(&cursor.0) || cursor.1 < 0 {
            return Err(invalid());
        }
        Ok(cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor() -> Cursor {
        Cursor(
            1,
            42,
            [
                "10.0.0.1:5701".into(),
                "ns".into(),
                "w\"é,".into(),
                String::new(),
                "outbound|5701||x".into(),
                "blackholed".into(),
            ],
        )
    }

    #[test]
    fn cursors_round_trip_and_read_as_one_url_safe_word() {
        let text = cursor().encode();
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{text}"
        );
        let page = Page::parse(Some("5"), Some(&text)).expect("valid");
        assert_eq!(page.limit, 5);
        assert_eq!(page.after, Some(cursor()));
        let (sql, values) = page.sql_after();
        assert_eq!(sql.matches('?').count(), values.len());
        assert_eq!(values[1], Value::Integer(-42));
    }

    #[test]
    fn bad_limits_and_cursors_name_the_parameter() {
        for limit in ["0", "-1", "10001", "ten", "", "1e3"] {
            let err = Page::parse(Some(limit), None).expect_err(limit);
            assert_eq!(
                err.to_string(),
                format!("limit {limit:?}: expected a number of rows from 1 to 10000")
            );
        }
        let out_of_range = URL_SAFE_NO_PAD.encode(r#"[7,1,["a","b","c","d","e","f"]]"#);
        let negative = URL_SAFE_NO_PAD.encode(r#"[0,-1,["a","b","c","d","e","f"]]"#);
        let short = URL_SAFE_NO_PAD.encode(r#"[0,1,["a"]]"#);
        for cursor in ["", "!!!", "bm90IGpzb24", &out_of_range, &negative, &short] {
            let err = Page::parse(None, Some(cursor)).expect_err(cursor);
            assert!(
                err.to_string()
                    .ends_with("expected the nextCursor of an earlier page of the report"),
                "{err}"
            );
            assert_eq!(err.parameter(), "cursor");
        }
        assert_eq!(Page::parse(None, None), Ok(Page::default()));
    }
}
