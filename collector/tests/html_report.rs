//! `dialguard report --format html` in a real browser: a database filled
//! through the real ingest (with names a sidecar could send to break a page),
//! the page made by the real binary, loaded by headless Chromium (Debian's
//! `chromium`). Checked: no script error or console message, the findings in
//! the rendered DOM are exactly the JSON report's rows, and nothing was
//! fetched (Chromium is pointed at a proxy that this test owns and that
//! counts every connection). Deliberately broken pages show that each of
//! those checks really detects its fault. Chromium is killed (its process
//! group, by PID) if it outlives its bound.

mod common;
mod report_fixture;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use dialguard_collector::report::Report;
use report_fixture::*;

/// Longest a single Chromium run may take.
const CHROMIUM_BOUND: Duration = Duration::from_secs(90);

fn chromium_binary() -> PathBuf {
    let binary = std::env::var("DIALGUARD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let path = PathBuf::from(binary);
    assert!(
        path.exists(),
        "{} not found: install Debian's `chromium` (.ci/run does) or set DIALGUARD_CHROMIUM",
        path.display()
    );
    path
}

/// A stand-in HTTP proxy on loopback: every connection Chromium makes for
/// the page (http, https, ws) arrives here; each is counted and answered 502
/// at once, so that a page that does fetch still finishes loading.
struct CountingProxy {
    addr: SocketAddr,
    requests: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CountingProxy {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("non-blocking proxy");
        let addr = listener.local_addr().expect("proxy address");
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (requests, stop) = (requests.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let requests = requests.clone();
                            // One thread per connection: a silent preconnect
                            // must not hold up the next request.
                            std::thread::spawn(move || {
                                let _ = stream.set_nonblocking(false);
                                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                                let mut head = [0u8; 512];
                                let read = stream.read(&mut head).unwrap_or(0);
                                let first_line = String::from_utf8_lossy(&head[..read])
                                    .lines()
                                    .next()
                                    .unwrap_or_default()
                                    .to_string();
                                if let Ok(mut requests) = requests.lock() {
                                    requests.push(first_line);
                                }
                                let _ = stream.write_all(
                                    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                                );
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }
        });
        Self {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// The page's requests: all requests, minus the ones Chromium makes for
    /// itself whatever the page (network time, component updates, account
    /// checks: measured on this Chromium 156, which makes them despite
    /// --disable-background-networking). A page fetching those hosts would
    /// still be caught by its Content Security Policy (a console error) and
    /// by the attribute checks.
    /// Connections that stayed silent (a speculative preconnect to the
    /// proxy) request nothing and are not counted.
    fn seen(&self) -> (usize, Vec<String>) {
        let requests = self.requests.lock().map(|r| r.clone()).unwrap_or_default();
        let page: Vec<String> = requests
            .into_iter()
            .filter(|line| !line.is_empty() && !chromium_own_request(line))
            .collect();
        (page.len(), page)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Chromium's own service requests, by their target host (the request line
/// a proxy sees: `GET http://host/...` or `CONNECT host:443`).
fn chromium_own_request(request_line: &str) -> bool {
    let target = request_line.split_whitespace().nth(1).unwrap_or_default();
    let host = target
        .trim_start_matches("http://")
        .split(['/', ':'])
        .next()
        .unwrap_or_default();
    [
        "clients2.google.com",
        "update.googleapis.com",
        "accounts.google.com",
    ]
    .contains(&host)
}

/// What one headless load of a page left behind.
struct PageRun {
    /// `--dump-dom`: the DOM after the page's scripts ran.
    dom: String,
    /// Chromium's log: console messages appear as `INFO:CONSOLE` lines.
    log: String,
    /// Connections the page (or Chromium for it) made.
    network: (usize, Vec<String>),
}

/// Loads `page` in headless Chromium and returns its DOM, log and network use.
fn load_in_chromium(page: &Path) -> PageRun {
    let proxy = CountingProxy::start();
    let profile = tempfile::tempdir().expect("profile dir");
    let log_path = profile.path().join("chromium.log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(chromium_binary())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        // Every fetch, loopback included, goes to the counting proxy.
        .arg(format!("--proxy-server=http://{}", proxy.addr))
        .arg("--proxy-bypass-list=<-loopback>")
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        // Its own process group, so that a timeout kills its helpers too.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|err| panic!("starting chromium: {err}"));
    let pid = child.id();
    let mut stdout = child.stdout.take().expect("chromium stdout");
    let reader = std::thread::spawn(move || {
        let mut dom = String::new();
        let _ = stdout.read_to_string(&mut dom);
        dom
    });
    let deadline = Instant::now() + CHROMIUM_BOUND;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => break None,
        }
    };
    // Whatever is left of its process group (helpers, or all of it on timeout).
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!("chromium did not finish within {CHROMIUM_BOUND:?}; killed. Log:\n{log}")
    });
    let dom = reader.join().unwrap_or_default();
    assert!(status.success(), "chromium failed ({status}). Log:\n{log}");
    // Give a connection made just before exit time to be counted.
    std::thread::sleep(Duration::from_millis(100));
    PageRun {
        dom,
        log,
        network: proxy.seen(),
    }
}

// ---------------------------------------------------------------------------
// A small reader of the DOM that Chromium serializes: start tags and their
// (double-quoted) attributes, skipping the contents of script and style.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Element {
    name: String,
    attributes: BTreeMap<String, String>,
}

fn decode_entities(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('&') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let known = [
            ("&amp;", "&"),
            ("&quot;", "\""),
            ("&lt;", "<"),
            ("&gt;", ">"),
            ("&#39;", "'"),
            ("&nbsp;", "\u{a0}"),
        ];
        match known.iter().find(|(entity, _)| after.starts_with(entity)) {
            Some((entity, character)) => {
                out.push_str(character);
                rest = &after[entity.len()..];
            }
            None => {
                out.push('&');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn elements(html: &str) -> Vec<Element> {
    let mut found = Vec::new();
    let mut rest = html;
    while let Some(open) = rest.find('<') {
        rest = &rest[open + 1..];
        if rest.starts_with('/') || rest.starts_with('!') {
            continue;
        }
        let name_end = rest
            .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
            .unwrap_or(rest.len());
        let name = rest[..name_end].to_ascii_lowercase();
        rest = &rest[name_end..];
        let mut attributes = BTreeMap::new();
        loop {
            rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '/');
            if rest.is_empty() || rest.starts_with('>') {
                rest = rest.get(1..).unwrap_or("");
                break;
            }
            let attr_end = rest
                .find(|c: char| c.is_whitespace() || c == '=' || c == '>')
                .unwrap_or(rest.len());
            let attr = rest[..attr_end].to_ascii_lowercase();
            rest = &rest[attr_end..];
            let value = if let Some(after) = rest.strip_prefix("=\"") {
                let close = after.find('"').expect("a closing quote");
                let value = decode_entities(&after[..close]);
                rest = &after[close + 1..];
                value
            } else {
                String::new()
            };
            attributes.insert(attr, value);
        }
        if name == "script" || name == "style" {
            let close = format!("</{name}");
            let end = rest.find(&close).unwrap_or(rest.len());
            rest = &rest[end..];
        }
        found.push(Element { name, attributes });
    }
    found
}

// ---------------------------------------------------------------------------
// The checks, each able to fail on its own (see the broken pages below).
// ---------------------------------------------------------------------------

/// Everything wrong with a page run: script errors, console messages, a
/// script that did not finish, fetches.
fn problems(run: &PageRun, expected_findings: usize) -> Vec<String> {
    let mut problems = Vec::new();
    for line in run.log.lines() {
        if line.contains(":CONSOLE") || line.contains("Uncaught") {
            problems.push(format!("console: {line}"));
        }
    }
    let all = elements(&run.dom);
    match all.iter().find(|e| e.name == "html") {
        Some(html) => {
            if let Some(error) = html.attributes.get("data-js-error") {
                problems.push(format!("script error recorded by the page: {error}"));
            }
            match html.attributes.get("data-ready") {
                Some(count) if *count == expected_findings.to_string() => {}
                Some(count) => problems.push(format!(
                    "the page's script saw {count} findings, expected {expected_findings}"
                )),
                None => problems.push("the page's script did not run to its end".into()),
            }
        }
        None => problems.push("no <html> element in the DOM".into()),
    }
    let (connections, requests) = &run.network;
    if *connections > 0 {
        problems.push(format!(
            "the page made {connections} network connections: {requests:?}"
        ));
    }
    for element in &all {
        for (name, value) in &element.attributes {
            let loads = matches!(
                name.as_str(),
                "src"
                    | "srcset"
                    | "href"
                    | "xlink:href"
                    | "action"
                    | "formaction"
                    | "poster"
                    | "data"
            );
            if loads && !value.starts_with('#') {
                problems.push(format!(
                    "<{} {name}={value:?}> refers outside the page",
                    element.name
                ));
            }
            if name.starts_with("on") {
                problems.push(format!("<{} {name}> is an inline handler", element.name));
            }
        }
        if matches!(
            element.name.as_str(),
            "img" | "iframe" | "object" | "embed" | "link" | "base" | "video" | "audio" | "source"
        ) {
            problems.push(format!("<{}> element in the page", element.name));
        }
    }
    if run.dom.contains("url(") || run.dom.contains("@import") {
        problems.push("the page's CSS refers to a URL".into());
    }
    problems
}

/// A finding as the page shows it and as the JSON report has it.
type FindingKey = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
);

fn dom_findings(dom: &str) -> Vec<FindingKey> {
    elements(dom)
        .into_iter()
        .filter(|e| e.attributes.contains_key("data-finding"))
        .map(|e| {
            let get = |name: &str| {
                e.attributes
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| panic!("a finding without {name}: {e:?}"))
            };
            (
                get("data-source-namespace"),
                get("data-source-workload"),
                get("data-dialed"),
                get("data-reached"),
                get("data-cluster"),
                get("data-verdict"),
                get("data-count"),
                get("data-first-seen"),
                get("data-last-seen"),
            )
        })
        .collect()
}

fn json_findings(report: &Report) -> Vec<FindingKey> {
    report
        .rows
        .iter()
        .map(|row| {
            (
                row.source_namespace.clone(),
                row.source_workload.clone(),
                row.original_destination.clone(),
                row.upstream_host.clone().unwrap_or_default(),
                row.cluster.clone(),
                row.verdict.clone(),
                row.count.to_string(),
                row.first_seen.clone(),
                row.last_seen.clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_html_report_renders_in_chromium_as_the_json_report_says_and_fetches_nothing() {
    let chromium = chromium_binary();
    let (dir, db) = temp_db();
    let server = Server::start(&db).await;
    fill(&server).await;
    server.stop().await;
    let json: Report = serde_json::from_str(&report_ok(&db, &["--format", "json"]).await)
        .expect("the JSON report");
    let html = report_ok(&db, &["--format", "html"]).await;
    assert_eq!(json.rows.len(), 5, "the fixture's rows");

    let page = dir.path().join("report.html");
    std::fs::write(&page, &html).expect("write the page");
    // To look at the page: DIALGUARD_HTML_REPORT_OUT=/tmp/report.html
    if let Ok(out) = std::env::var("DIALGUARD_HTML_REPORT_OUT") {
        std::fs::write(&out, &html).unwrap_or_else(|err| panic!("{out}: {err}"));
    }
    let started = Instant::now();
    let run = tokio::task::spawn_blocking({
        let page = page.clone();
        move || load_in_chromium(&page)
    })
    .await
    .expect("chromium runner");
    eprintln!(
        "{} loaded the report in {:?}",
        chromium.display(),
        started.elapsed()
    );

    let found = problems(&run, json.rows.len());
    assert!(found.is_empty(), "problems with the page: {found:#?}");
    // The rendered findings are exactly the JSON rows, in order, hostile
    // names included (escaped in the file, intact in the DOM).
    assert_eq!(dom_findings(&run.dom), json_findings(&json));
    let workloads: Vec<String> = dom_findings(&run.dom).into_iter().map(|f| f.1).collect();
    assert!(
        workloads.iter().any(|w| w == HOSTILE_WORKLOAD),
        "{workloads:?}"
    );
    let scripts = elements(&run.dom)
        .iter()
        .filter(|e| e.name == "script")
        .count();
    assert_eq!(scripts, 1, "only the page's own script");
    // The summary's totals and the gaps agree with the JSON.
    let all = elements(&run.dom);
    for verdict in ["misrouted", "blackholed", "redirected"] {
        let expected: u64 = json
            .rows
            .iter()
            .filter(|row| row.verdict == verdict)
            .map(|row| row.count)
            .sum();
        let card = all
            .iter()
            .find(|e| e.attributes.get("data-verdict-total").map(String::as_str) == Some(verdict))
            .unwrap_or_else(|| panic!("no summary card for {verdict}"));
        assert_eq!(
            card.attributes["data-connections"],
            expected.to_string(),
            "{verdict}"
        );
    }
    assert!(
        run.dom.contains("data-gap=\"droppedEvents\">4<"),
        "the sidecar's 4 dropped events are shown"
    );
    // The raw file also names nothing outside itself.
    assert!(!html.contains("http://") && !html.contains("https://"));

    // --- The checks above detect what they claim to. -----------------------
    let broken = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write a broken page");
        path
    };
    let without_policy = {
        let start = html
            .find("<meta http-equiv=\"Content-Security-Policy\"")
            .expect("policy");
        let end = start + html[start..].find('>').expect("end of meta") + 1;
        format!("{}{}", &html[..start], &html[end..])
    };
    let cases = [
        (
            // A script error after the page's own script ran.
            broken(
                "throws.html",
                without_policy.replace("</body>", "<script>null.boom();</script></body>"),
            ),
            "script error recorded by the page",
        ),
        (
            // An edited inline script no longer matches the policy's hash:
            // the browser refuses it and says so on the console.
            broken(
                "refused.html",
                html.replacen("'use strict';", "'use strict'; ", 1),
            ),
            "the page's script did not run to its end",
        ),
        (
            // A fetch, which only the network check sees.
            broken(
                "fetches.html",
                without_policy.replace(
                    "</body>",
                    "<img src=\"http://192.0.2.1/pixel.png\" alt=\"\"></body>",
                ),
            ),
            "network connections",
        ),
    ];
    for (path, expected) in cases {
        let run = tokio::task::spawn_blocking(move || load_in_chromium(&path))
            .await
            .expect("chromium runner");
        let found = problems(&run, json.rows.len());
        eprintln!("broken page detected as intended: {found:#?}");
        assert!(
            found.iter().any(|problem| problem.contains(expected)),
            "a broken page went undetected (wanted {expected:?}): {found:#?}"
        );
    }
}

#[test]
fn the_dom_reader_decodes_attributes_and_skips_script_text() {
    let parsed = elements(
        "<html data-ready=\"2\"><p data-finding=\"\" data-x=\"a&amp;b&quot;&lt;&gt;'\">t</p>\
         <script>if (a<b) { x = '<p data-finding>'; }</script><br></html>",
    );
    let names: Vec<&str> = parsed.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["html", "p", "script", "br"]);
    assert_eq!(parsed[1].attributes["data-x"], "a&b\"<>'");
    assert!(parsed[1].attributes.contains_key("data-finding"));
}
