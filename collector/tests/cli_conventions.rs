//! The command line's conventions, run as the `dialguard` binary against a
//! database filled through the real ingest (report_fixture): `-o/--output`
//! (and its `--format` alias), `-o wide`, tables fitted to `COLUMNS`, exit
//! status 1 for findings (`report --fail-on`, `analyze`) and 2 for every
//! error, the gap counts in CSV, and shell completion that bash really runs.

mod common;
mod report_fixture;

use std::process::Output;

use common::*;
use dialguard_collector::ServeConfig;
use dialguard_collector::report::GAPS_CSV_HEADER;
use report_fixture::*;
use unicode_width::UnicodeWidthStr;

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `dialguard ARGS` with `env`, bounded in time.
async fn dialguard(args: &[&str], env: &[(&str, &str)]) -> Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dialguard"))
        .args(args)
        .env_remove("COLUMNS")
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    bounded("dialguard", child)
        .await
        .unwrap_or_else(|err| panic!("running dialguard {args:?}: {err}"))
}

/// The lines of the tables in `text` (their borders start them).
fn table_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .filter(|line| line.starts_with(['┌', '│', '╞', '├', '└']))
}

/// A database with the report fixture, filled by a collector told to
/// expect namespace `payments`, where no sidecar reports.
async fn filled_db() -> (tempfile::TempDir, String) {
    let (dir, db) = temp_db();
    let server = Server::start_with(ServeConfig {
        expected_namespaces: ["payments".to_string()].into(),
        ..test_config(&db)
    })
    .await;
    fill(&server).await;
    server.stop().await;
    (dir, db.to_str().expect("UTF-8 path").to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn output_formats_take_dash_o_and_the_table_fits_columns() {
    let (_dir, db) = filled_db().await;
    let report = |args: &'static [&'static str], columns: Option<&'static str>| {
        let db = db.clone();
        async move {
            let mut all = vec!["report", "--db", db.as_str()];
            all.extend_from_slice(args);
            let env: Vec<(&str, &str)> = columns.map(|c| ("COLUMNS", c)).into_iter().collect();
            let out = dialguard(&all, &env).await;
            assert_eq!(out.status.code(), Some(0), "{all:?}: {}", stderr_of(&out));
            stdout_of(&out)
        }
    };

    // `-o`, `--output` and the old `--format` give the same JSON.
    let json = report(&["-o", "json"], None).await;
    assert_eq!(report(&["--output", "json"], None).await, json);
    assert_eq!(report(&["--format", "json"], None).await, json);
    serde_json::from_str::<serde_json::Value>(&json).expect("JSON report");

    // The default table leaves out what `-o wide` adds.
    let table = report(&[], None).await;
    let wide = report(&["-o", "wide"], None).await;
    for column in ["would close", "enforced", "first seen", "source pods"] {
        assert!(!table.contains(column), "{column} in the table:\n{table}");
        assert!(wide.contains(column), "{column} not in -o wide:\n{wide}");
    }
    assert!(
        table.contains("last seen") && table.contains("misrouted"),
        "{table}"
    );

    // Fitted into COLUMNS=100: every table line at most that wide (the
    // notes below are prose the terminal wraps itself), addresses whole,
    // and what cannot fit left out, and said.
    let text = report(&[], Some("100")).await;
    println!("-- report with COLUMNS=100:\n{text}");
    let widest = table_lines(&text)
        .map(UnicodeWidthStr::width)
        .max()
        .unwrap_or(0);
    assert!(widest <= 100, "a line of {widest} columns:\n{text}");
    for whole in [
        "10.0.2.4:5701",
        "10.0.9.9:5701",
        "[fd00::5]:9090",
        "payments",
    ] {
        assert!(text.contains(whole), "{whole} broken or missing:\n{text}");
    }
    assert!(
        text.contains("columns left out to fit the terminal: "),
        "{text}"
    );
    // Wide enough, nothing is left out.
    let roomy = report(&[], Some("400")).await;
    assert_eq!(roomy, table, "the table at 400 columns is the unfitted one");
    // `-o wide` keeps every column at full width whatever COLUMNS says.
    let squeezed_wide = report(&["-o", "wide"], Some("100")).await;
    assert_eq!(squeezed_wide, wide);
    let widest = table_lines(&wide)
        .map(UnicodeWidthStr::width)
        .max()
        .unwrap_or(0);
    assert!(widest > 100, "the wide table is only {widest} wide");

    // A name of the column set comes back as the user's error.
    let bad = dialguard(&["report", "--db", &db, "-o", "yaml"], &[]).await;
    assert_eq!(bad.status.code(), Some(2), "{}", stderr_of(&bad));
    assert!(stderr_of(&bad).contains("'yaml'"), "{}", stderr_of(&bad));
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_on_exits_1_after_the_report_and_errors_exit_2() {
    let (_dir, db) = filled_db().await;
    let run = |args: Vec<&'static str>| {
        let db = db.clone();
        async move {
            let mut all = vec!["report".to_string(), "--db".into(), db];
            all.extend(args.into_iter().map(str::to_string));
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            dialguard(&all, &[]).await
        }
    };

    let out = run(vec!["--fail-on", "misrouted"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(
        stdout_of(&out).contains("10.0.2.4:5701"),
        "the report is printed first"
    );
    assert!(
        stderr_of(&out).contains("misrouted rows"),
        "{}",
        stderr_of(&out)
    );

    // Only verdicts the filters leave in count.
    let out = run(vec!["--fail-on", "misrouted", "--verdict", "redirected"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let out = run(vec!["--fail-on", "blackholed", "--port", "443"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));

    // A verdict beyond this page still fails: one row per page, worst
    // first, puts every blackholed row after the first page.
    let out = run(vec!["--limit", "1", "--fail-on", "blackholed,redirected"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(
        !stdout_of(&out).contains("blackholed"),
        "{}",
        stdout_of(&out)
    );
    assert!(
        stderr_of(&out).contains("blackholed rows, redirected rows"),
        "{}",
        stderr_of(&out)
    );

    // `uncovered`: payments is expected and no sidecar there reports.
    let out = run(vec!["-o", "json", "--fail-on", "uncovered"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("uncovered namespaces (payments)"));
    serde_json::from_str::<serde_json::Value>(&stdout_of(&out)).expect("JSON printed in full");

    // Every error is 2: clap's usage errors, ours, and an unusable source.
    for args in [
        vec!["--fail-on", "nothing"],
        vec!["--since", "yesterday"],
        vec!["--section", "gaps"],
        vec!["--namespace", ""],
    ] {
        let out = run(args.clone()).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr_of(&out));
        assert!(stdout_of(&out).is_empty(), "{args:?} printed a report");
    }
    let out = dialguard(&["report", "--db", "/nonexistent/dialguard.db"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    let out = dialguard(&["analyze", "/nonexistent/config_dump.json"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_carries_the_gap_counts() {
    let (_dir, db) = filled_db().await;
    let json = dialguard(&["report", "--db", &db, "-n", "app", "-o", "json"], &[]).await;
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON report");
    assert_eq!(
        json["droppedEvents"], 4,
        "the fixture's app sidecar dropped 4"
    );

    let out = dialguard(
        &[
            "report",
            "--db",
            &db,
            "-n",
            "app",
            "-o",
            "csv",
            "--section",
            "gaps",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let text = stdout_of(&out);
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .expect("header")
        .iter()
        .map(str::to_string)
        .collect();
    assert_eq!(header, GAPS_CSV_HEADER);
    let records: Vec<csv::StringRecord> = reader.records().collect::<Result<_, _>>().expect("CSV");
    assert_eq!(records.len(), 1, "{text}");
    let cell = |name: &str| {
        let at = GAPS_CSV_HEADER
            .iter()
            .position(|h| *h == name)
            .expect("column");
        records[0][at].to_string()
    };
    assert_eq!(cell("total rows"), json["totalRows"].to_string());
    assert_eq!(cell("rows shown"), "2");
    assert_eq!(cell("truncated"), "false");
    assert_eq!(cell("dropped events"), "4");
    assert_eq!(cell("rejected events"), "0");

    // The rows CSV stays data only and says the same on stderr.
    let out = dialguard(&["report", "--db", &db, "-n", "app", "-o", "csv"], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("sidecars dropped 4 events"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(stdout_of(&out).lines().count(), 3, "{}", stdout_of(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn bash_completes_subcommands_and_flags_from_the_generated_script() {
    let script = dialguard(&["completion", "bash"], &[]).await;
    assert_eq!(script.status.code(), Some(0), "{}", stderr_of(&script));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dialguard.bash");
    std::fs::write(&path, &script.stdout).expect("write script");
    // What bash does on TAB: the completion function with COMP_WORDS set.
    let complete = |words: &str| {
        let path = path.clone();
        let words = words.to_string();
        async move {
            let program = format!(
                "source {}; COMP_WORDS=({words} ''); COMP_CWORD=${{#COMP_WORDS[@]}}; \
                 COMP_CWORD=$((COMP_CWORD-1)); COMP_LINE=\"{words} \"; COMP_POINT=${{#COMP_LINE}}; \
                 _dialguard dialguard '' \"${{COMP_WORDS[COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                path.display()
            );
            let out = bounded(
                "bash completion",
                tokio::process::Command::new("bash")
                    .args(["--norc", "-c", &program])
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .expect("bash runs");
            assert!(out.status.success(), "bash: {}", stderr_of(&out));
            stdout_of(&out)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        }
    };
    let subcommands = complete("dialguard").await;
    for name in ["serve", "report", "rollout", "analyze", "completion"] {
        assert!(
            subcommands.iter().any(|w| w == name),
            "{name}: {subcommands:?}"
        );
    }
    let report_flags = complete("dialguard report").await;
    for flag in ["--output", "--fail-on", "--namespace", "--db"] {
        assert!(
            report_flags.iter().any(|w| w == flag),
            "{flag}: {report_flags:?}"
        );
    }
    let outputs = complete("dialguard report -o").await;
    for value in ["table", "wide", "json", "csv", "html"] {
        assert!(outputs.iter().any(|w| w == value), "{value}: {outputs:?}");
    }

    // zsh and fish scripts name the same commands (their shells are not
    // installed here to run them).
    for shell in ["zsh", "fish"] {
        let out = dialguard(&["completion", shell], &[]).await;
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", stderr_of(&out));
        let text = stdout_of(&out);
        assert!(
            text.contains("fail-on") && text.contains("rollout"),
            "{shell}: {text}"
        );
    }
    let out = dialguard(&["completion", "powershell"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
}
