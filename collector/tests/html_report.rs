//! `dialguard report --format html` in a real browser: a database filled
//! through the real ingest (with names a sidecar could send to break a page),
//! the page made by the real binary, and a report built here with every
//! field of the trust work (causes, culprits, would-close counts, source
//! pods, hostile strings, absurd names) rendered by the crate, each loaded by
//! headless Chromium (Debian's `chromium`) and probed over the DevTools
//! protocol as on screen and as printed. Checked: no script error or console
//! message, the findings in the rendered DOM are exactly the JSON report's
//! rows, nothing was fetched (Chromium is pointed at a proxy that this test
//! owns and that counts every connection), findings are grouped by root
//! cause worst first with the object to change, its inspect command and the
//! fix (code spans as `<code>`), diagram labels lie inside their boxes, and
//! print hides the controls. Deliberately broken pages and probes show that
//! each of those checks really detects its fault. Chromium is killed (its
//! process group, by PID) if it outlives its bound.

mod common;
mod report_fixture;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use dialguard_collector::finding::{Cause, Culprit};
use dialguard_collector::report::html::{MAX_LABEL_CHARS, render_html};
use dialguard_collector::report::{Intended, Report, ReportRow, VERDICTS};
use report_fixture::*;
use serde::Deserialize;

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
        // Optimization hints, seen in runs driven over DevTools (they last longer).
        "optimizationguide-pa.googleapis.com",
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

/// The flags of every run: headless, a throwaway profile, logging of
/// console messages, and every fetch (loopback included) sent to `proxy`.
fn chromium_args(profile: &Path, proxy: SocketAddr) -> Vec<String> {
    let mut args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--enable-logging=stderr",
        "--v=0",
    ]
    .map(String::from)
    .into();
    args.push(format!("--user-data-dir={}", profile.display()));
    args.push(format!("--proxy-server=http://{proxy}"));
    args.push("--proxy-bypass-list=<-loopback>".into());
    args
}

/// Waits for `child` (the leader of its own process group) at most
/// [`CHROMIUM_BOUND`], then kills what is left of the group (helpers, or
/// all of it on timeout). `None` when it had to be killed.
fn wait_bounded(mut child: Child) -> Option<ExitStatus> {
    let pid = child.id();
    let deadline = Instant::now() + CHROMIUM_BOUND;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => break None,
        }
    };
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
    status
}

/// Loads `page` in headless Chromium and returns its DOM, log and network use.
fn load_in_chromium(page: &Path) -> PageRun {
    let proxy = CountingProxy::start();
    let profile = tempfile::tempdir().expect("profile dir");
    let log_path = profile.path().join("chromium.log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(chromium_binary())
        .args(chromium_args(profile.path(), proxy.addr))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        // Its own process group, so that a timeout kills its helpers too.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|err| panic!("starting chromium: {err}"));
    let mut stdout = child.stdout.take().expect("chromium stdout");
    let reader = std::thread::spawn(move || {
        let mut dom = String::new();
        let _ = stdout.read_to_string(&mut dom);
        dom
    });
    let status = wait_bounded(child);
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

/// A page run driven over the DevTools protocol: the page as on screen,
/// then as printed.
struct Inspection {
    /// What each of the `then` expressions evaluated to, in order.
    then: Vec<serde_json::Value>,
    run: PageRun,
    screen: Probe,
    print: Probe,
}

/// Chromium's DevTools protocol on a pipe (`--remote-debugging-pipe`:
/// commands in on its fd 3, answers out on its fd 4, JSON messages ended by
/// a NUL byte), attached to the page's target.
struct Devtools {
    input: ChildStdin,
    output: BufReader<ChildStdout>,
    next_id: u64,
    session: Option<String>,
}

impl Devtools {
    fn call(
        &mut self,
        method: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = serde_json::json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            message["sessionId"] = session.clone().into();
        }
        let mut bytes = message.to_string().into_bytes();
        bytes.push(0);
        self.input
            .write_all(&bytes)
            .map_err(|err| format!("{method}: writing: {err}"))?;
        loop {
            let mut answer = Vec::new();
            let read = self
                .output
                .read_until(0, &mut answer)
                .map_err(|err| format!("{method}: reading: {err}"))?;
            if read == 0 || answer.last() != Some(&0) {
                return Err(format!("{method}: chromium closed the pipe"));
            }
            answer.pop();
            let answer: serde_json::Value = serde_json::from_slice(&answer)
                .map_err(|err| format!("{method}: not JSON: {err}"))?;
            // Events (no id) and answers to no one are skipped.
            if answer["id"] != id {
                continue;
            }
            if let Some(error) = answer.get("error") {
                return Err(format!("{method}: {error}"));
            }
            return Ok(answer["result"].clone());
        }
    }

    /// The value of `expression` in the page (DevTools evaluation is not
    /// subject to the page's Content Security Policy).
    fn evaluate(&mut self, expression: &str) -> Result<serde_json::Value, String> {
        let result = self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": expression, "returnByValue": true}),
        )?;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(format!("evaluating {expression:.60}: {exception}"));
        }
        Ok(result["result"]["value"].clone())
    }
}

/// Loads `page` in headless Chromium, then reads its DOM, runs [`PROBE`]
/// once as on screen and once with print media emulated, then evaluates
/// `then` (which may act on the page) in order.
fn inspect_in_chromium(page: &Path, then: Vec<String>) -> Inspection {
    let proxy = CountingProxy::start();
    let profile = tempfile::tempdir().expect("profile dir");
    let log_path = profile.path().join("chromium.log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    // The shell hands Chromium the two pipes as fds 3 and 4 (std cannot
    // without unsafe code) and execs it, keeping the process group.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"exec "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
        .arg("sh")
        .arg(chromium_binary())
        .args(chromium_args(profile.path(), proxy.addr))
        .arg("--remote-debugging-pipe")
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|err| panic!("starting chromium: {err}"));
    let input = child.stdin.take().expect("devtools input");
    let output = BufReader::new(child.stdout.take().expect("devtools output"));
    // On timeout the watchdog kills Chromium, which ends any read below.
    let watchdog = std::thread::spawn(move || wait_bounded(child));
    let mut devtools = Devtools {
        input,
        output,
        next_id: 0,
        session: None,
    };
    let conversation = (|| -> Result<(String, Probe, Probe, Vec<serde_json::Value>), String> {
        let targets = devtools.call("Target.getTargets", serde_json::json!({}))?;
        let target = targets["targetInfos"]
            .as_array()
            .and_then(|all| all.iter().find(|t| t["type"] == "page"))
            .ok_or_else(|| format!("no page target: {targets}"))?["targetId"]
            .clone();
        let attached = devtools.call(
            "Target.attachToTarget",
            serde_json::json!({"targetId": target, "flatten": true}),
        )?;
        devtools.session = attached["sessionId"].as_str().map(String::from);
        // The target exists before the file is loaded (about:blank first).
        let loaded = "location.protocol === 'file:' && document.readyState === 'complete'";
        while devtools.evaluate(loaded)? != true {
            std::thread::sleep(Duration::from_millis(20));
        }
        let dom = devtools.evaluate("document.documentElement.outerHTML")?;
        let probe = |devtools: &mut Devtools| -> Result<Probe, String> {
            serde_json::from_value(devtools.evaluate(PROBE)?).map_err(|err| format!("probe: {err}"))
        };
        let screen = probe(&mut devtools)?;
        devtools.call(
            "Emulation.setEmulatedMedia",
            serde_json::json!({"media": "print"}),
        )?;
        let print = probe(&mut devtools)?;
        let then = then
            .iter()
            .map(|expression| devtools.evaluate(expression))
            .collect::<Result<Vec<_>, _>>()?;
        devtools.session = None;
        // Chromium may exit before it answers; the exit status tells.
        let _ = devtools.call("Browser.close", serde_json::json!({}));
        Ok((
            dom.as_str().unwrap_or_default().to_string(),
            screen,
            print,
            then,
        ))
    })();
    drop(devtools);
    let status = watchdog.join().expect("watchdog");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let (dom, screen, print, then) =
        conversation.unwrap_or_else(|err| panic!("driving chromium: {err}. Log:\n{log}"));
    let status = status.unwrap_or_else(|| {
        panic!("chromium did not finish within {CHROMIUM_BOUND:?}; killed. Log:\n{log}")
    });
    assert!(status.success(), "chromium failed ({status}). Log:\n{log}");
    std::thread::sleep(Duration::from_millis(100));
    Inspection {
        run: PageRun {
            dom,
            log,
            network: proxy.seen(),
        },
        screen,
        print,
        then,
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

/// A finding's attributes, named as the page has them, as the page shows
/// them or as the JSON report has them.
type FindingKey = BTreeMap<&'static str, String>;

const FINDING_ATTRIBUTES: [&str; 11] = [
    "data-source-namespace",
    "data-source-workload",
    "data-dialed",
    "data-reached",
    "data-cluster",
    "data-verdict",
    "data-count",
    "data-would-close",
    "data-enforced",
    "data-first-seen",
    "data-last-seen",
];

/// The page's findings by their `data-finding` number (the JSON row's
/// number, from 1), in page order.
fn dom_findings(dom: &str) -> Vec<(String, FindingKey)> {
    elements(dom)
        .into_iter()
        .filter(|e| e.attributes.contains_key("data-finding"))
        .map(|e| {
            let key = FINDING_ATTRIBUTES
                .iter()
                .map(|name| {
                    let value = e.attributes.get(*name).cloned();
                    (
                        *name,
                        value.unwrap_or_else(|| panic!("a finding without {name}: {e:?}")),
                    )
                })
                .collect();
            (e.attributes["data-finding"].clone(), key)
        })
        .collect()
}

fn json_finding(row: &ReportRow) -> FindingKey {
    let values = [
        row.source_namespace.clone(),
        row.source_workload.clone(),
        row.original_destination.clone(),
        row.upstream_host.clone().unwrap_or_default(),
        row.cluster.clone(),
        row.verdict.clone(),
        row.count.to_string(),
        row.would_close.to_string(),
        row.enforced.to_string(),
        row.first_seen.clone(),
        row.last_seen.clone(),
    ];
    FINDING_ATTRIBUTES.into_iter().zip(values).collect()
}

/// Each JSON row is shown exactly once, as itself, whatever the page's order.
fn finding_problems(dom: &str, report: &Report) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = vec![0usize; report.rows.len()];
    for (number, shown) in dom_findings(dom) {
        let Some(index) = number
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=seen.len()).contains(n))
        else {
            problems.push(format!("finding {number:?} is no row of the report"));
            continue;
        };
        seen[index - 1] += 1;
        let expected = json_finding(&report.rows[index - 1]);
        if shown != expected {
            problems.push(format!(
                "finding {number} shows {shown:?}, the row is {expected:?}"
            ));
        }
    }
    for (index, times) in seen.into_iter().enumerate() {
        if times != 1 {
            problems.push(format!("row {} is shown {times} times", index + 1));
        }
    }
    problems
}

/// A change to what [`PROBE`] read, standing for a page fault.
type ProbeFault = fn(&mut Probe);

/// What [`PROBE`] reads from the rendered page.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    media: String,
    body_color: String,
    groups: Vec<ProbedGroup>,
    findings: Vec<ProbedFinding>,
    flow_sources: Vec<String>,
    would_close: Option<String>,
    labels: Vec<ProbedLabel>,
    edges: Vec<ProbedEdge>,
    interactive: Vec<ProbedControl>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProbedGroup {
    culprit: Option<String>,
    change: String,
    inspect: Option<String>,
    fix: Option<String>,
    fix_code: Vec<String>,
    cause_text: String,
    findings: Vec<String>,
    break_inside: String,
    shown: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct ProbedFinding {
    number: String,
    pods: Vec<String>,
    shown: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct ProbedLabel {
    title: String,
    lines: Vec<ProbedLine>,
}

#[derive(Debug, Clone, Deserialize)]
struct ProbedLine {
    text: String,
    /// The text's box lies within its node's box, and that within the SVG.
    inside: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct ProbedEdge {
    verdict: String,
    dash: String,
}

#[derive(Debug, Clone, Deserialize)]
struct ProbedControl {
    element: String,
    shown: bool,
}

/// Evaluated in the page (as on screen, then as printed): what it shows,
/// read from the layout, not from the HTML.
const PROBE: &str = r#"(() => {
  const shown = (e) => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden';
  const text = (e) => (e ? e.textContent : null);
  const all = (root, selector) => Array.from(root.querySelectorAll(selector));
  return {
    media: matchMedia('print').matches ? 'print' : 'screen',
    bodyColor: getComputedStyle(document.body).color,
    groups: all(document, '[data-group]').map((g) => ({
      culprit: text(g.querySelector('.culprit-object')),
      change: text(g.querySelector('.culprit')) || '',
      inspect: text(g.querySelector('pre.inspect')),
      fix: text(g.querySelector('.fix')),
      fixCode: all(g, '.fix code').map(text),
      causeText: text(g.querySelector('.cause-text')) || '',
      findings: all(g, '[data-finding]').map((f) => f.getAttribute('data-finding')),
      breakInside: getComputedStyle(g).breakInside,
      shown: shown(g),
    })),
    findings: all(document, '[data-finding]').map((f) => ({
      number: f.getAttribute('data-finding'),
      pods: all(f, '.pod').map(text),
      shown: shown(f),
    })),
    flowSources: all(document, '[data-flow-source]').map((f) => f.getAttribute('data-flow-source')),
    wouldClose: text(document.querySelector('.card[data-would-close] .number')),
    labels: all(document, 'svg.flow .node-box').map((g) => {
      const node = g.querySelector('rect').getBBox();
      const width = g.ownerSVGElement.viewBox.baseVal.width;
      return {
        title: text(g.querySelector('title')),
        lines: all(g, 'text').map((t) => {
          const b = t.getBBox();
          return {
            text: t.textContent,
            inside: b.width > 0 && b.x >= node.x && b.x + b.width <= node.x + node.width &&
              b.y >= node.y && b.y + b.height <= node.y + node.height && node.x + node.width <= width,
          };
        }),
      };
    }),
    edges: all(document, 'svg.flow path.edge').map((p) => ({
      verdict: p.classList[1] || '', dash: getComputedStyle(p).strokeDasharray,
    })),
    interactive: all(document, 'input, button, .controls').map((e) => ({
      element: e.outerHTML.slice(0, 80), shown: shown(e),
    })),
  };
})()"#;

fn severity(verdict: &str) -> usize {
    VERDICTS
        .iter()
        .position(|v| *v == verdict)
        .unwrap_or(VERDICTS.len())
}

/// Connections per verdict, misrouted first.
fn per_verdict<'a>(rows: impl IntoIterator<Item = &'a ReportRow>) -> [u64; 3] {
    let mut counts = [0; 3];
    for row in rows {
        if let Some(count) = counts.get_mut(severity(&row.verdict)) {
            *count += row.count;
        }
    }
    counts
}

/// The spans between single backticks of a Markdown text (the fixtures'
/// texts use no longer runs).
fn code_spans(text: &str) -> Vec<String> {
    let pieces: Vec<&str> = text.split('`').collect();
    let paired = if pieces.len() % 2 == 1 {
        pieces.len()
    } else {
        pieces.len() - 1
    };
    pieces[..paired]
        .iter()
        .skip(1)
        .step_by(2)
        .map(|s| s.to_string())
        .collect()
}

/// Distinct non-empty values, first seen first.
fn distinct(values: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for value in values {
        if !value.is_empty() && !out.contains(&value) {
            out.push(value);
        }
    }
    out
}

/// The row a `data-finding` number stands for.
fn row_of<'a>(report: &'a Report, number: &str) -> Option<&'a ReportRow> {
    let index = number.parse::<usize>().ok()?;
    report.rows.get(index.checked_sub(1)?)
}

type GroupKey = (Cause, Option<Culprit>, String);

/// Rows that one change fixes: the same cause and object to change (or,
/// with no object named, the same capturing service).
fn group_key(row: &ReportRow) -> GroupKey {
    let capturing = match row.culprit {
        Some(_) => String::new(),
        None => row.capturing_service.clone(),
    };
    (row.cause, row.culprit.clone(), capturing)
}

/// Everything wrong with how the page (as probed on screen) groups,
/// orders and explains the report's rows.
fn grouping_problems(probe: &Probe, report: &Report) -> Vec<String> {
    let mut problems = Vec::new();
    let row = |number: &str| row_of(report, number);
    let mut keys_seen: Vec<GroupKey> = Vec::new();
    let mut previous: Option<(usize, u64)> = None;
    let mut grouped = 0;
    for (number, group) in probe.groups.iter().enumerate() {
        let number = number + 1;
        let rows: Vec<&ReportRow> = group.findings.iter().filter_map(|n| row(n)).collect();
        grouped += rows.len();
        let Some(first) = rows.first() else {
            problems.push(format!("group {number} has no findings"));
            continue;
        };
        let key = group_key(first);
        if rows.iter().any(|r| group_key(r) != key) {
            problems.push(format!("group {number} mixes causes or culprits"));
        }
        if keys_seen.contains(&key) {
            problems.push(format!(
                "group {number} repeats an earlier group's cause and culprit"
            ));
        }
        keys_seen.push(key);
        // Worst first: the worst verdict, then more connections of it.
        let worst = rows.iter().map(|r| severity(&r.verdict)).min().unwrap_or(0);
        let of_worst: u64 = rows
            .iter()
            .filter(|r| severity(&r.verdict) == worst)
            .map(|r| r.count)
            .sum();
        if let Some((before, before_count)) = previous {
            if (worst, std::cmp::Reverse(of_worst)) < (before, std::cmp::Reverse(before_count)) {
                problems.push(format!(
                    "group {number} ({} {of_worst}) is worse than the group before it",
                    VERDICTS.get(worst).unwrap_or(&"?")
                ));
            }
        }
        previous = Some((worst, of_worst));
        // The object to change and how to look at it.
        match &first.culprit {
            Some(culprit) => {
                let named = match (culprit.namespace.is_empty(), culprit.name.is_empty()) {
                    (false, false) => Some(format!(
                        "{} {}/{}",
                        culprit.kind, culprit.namespace, culprit.name
                    )),
                    (true, false) => Some(format!("{} {}", culprit.kind, culprit.name)),
                    _ => None,
                };
                let shown = group.culprit.clone().unwrap_or_default();
                let ok = match &named {
                    Some(named) => shown == *named,
                    None => shown.starts_with(&culprit.kind) && shown.contains("not known"),
                };
                if !ok {
                    problems.push(format!(
                        "group {number} names {shown:?} to change, the rows name {culprit:?}"
                    ));
                }
                if !culprit.inspect.is_empty()
                    && group.inspect.as_deref() != Some(culprit.inspect.as_str())
                {
                    problems.push(format!(
                        "group {number} shows inspect command {:?}, expected {:?}",
                        group.inspect, culprit.inspect
                    ));
                }
            }
            None => {
                if group.culprit.is_some() {
                    problems.push(format!(
                        "group {number} names a culprit the rows do not have"
                    ));
                }
                if !first.capturing_service.is_empty()
                    && !group.change.contains(&first.capturing_service)
                {
                    problems.push(format!(
                        "group {number} does not name the capturing service {:?}: {:?}",
                        first.capturing_service, group.change
                    ));
                }
            }
        }
        // The fix once, its code spans as <code>, the rest as plain text.
        let fixes = distinct(rows.iter().map(|r| r.fix.clone()));
        let expected_fix: String = fixes.iter().map(|f| f.replace('`', "")).collect();
        let expected_code: Vec<String> = fixes.iter().flat_map(|f| code_spans(f)).collect();
        let fix = group.fix.clone().unwrap_or_default();
        if fix != expected_fix {
            problems.push(format!(
                "group {number} shows fix {fix:?}, expected {expected_fix:?}"
            ));
        }
        if fix.contains('`') {
            problems.push(format!(
                "group {number}'s fix shows a literal backtick: {fix:?}"
            ));
        }
        if group.fix_code != expected_code {
            problems.push(format!(
                "group {number}'s fix has <code> {:?}, expected {expected_code:?}",
                group.fix_code
            ));
        }
        let causes = distinct(rows.iter().map(|r| r.cause_text.clone()));
        if !causes.is_empty() {
            let expected: String = causes.iter().map(|c| c.replace('`', "")).collect();
            if group.cause_text != expected {
                problems.push(format!(
                    "group {number} states cause {:?}, expected {expected:?}",
                    group.cause_text
                ));
            }
        }
    }
    if grouped != report.rows.len() || probe.findings.len() != report.rows.len() {
        problems.push(format!(
            "{grouped} findings in groups, {} in the page, {} rows",
            probe.findings.len(),
            report.rows.len()
        ));
    }
    for finding in &probe.findings {
        if let Some(row) = row(&finding.number) {
            if finding.pods != row.source_pods {
                problems.push(format!(
                    "finding {} shows pods {:?}, the row has {:?}",
                    finding.number, finding.pods, row.source_pods
                ));
            }
        }
    }
    // Workload diagrams worst first too.
    let mut by_source: BTreeMap<String, Vec<&ReportRow>> = BTreeMap::new();
    for row in &report.rows {
        by_source
            .entry(format!("{}/{}", row.source_namespace, row.source_workload))
            .or_default()
            .push(row);
    }
    let order: Vec<[u64; 3]> = probe
        .flow_sources
        .iter()
        .map(|source| per_verdict(by_source.get(source).into_iter().flatten().copied()))
        .collect();
    if probe.flow_sources.len() != by_source.len() || order.windows(2).any(|w| w[0] < w[1]) {
        problems.push(format!(
            "workload diagrams not worst first: {:?} with {order:?}",
            probe.flow_sources
        ));
    }
    let would_close: u64 = report.rows.iter().map(|row| row.would_close).sum();
    if probe.would_close != Some(would_close.to_string()) {
        problems.push(format!(
            "the summary's would-close figure reads {:?}, expected {would_close}",
            probe.would_close
        ));
    }
    for label in &probe.labels {
        for line in &label.lines {
            if !line.inside {
                problems.push(format!("label {:?} overflows its box", line.text));
            }
        }
    }
    problems
}

/// Everything wrong with the page as printed (against the same page on screen).
fn print_problems(screen: &Probe, print: &Probe) -> Vec<String> {
    let mut problems = Vec::new();
    if screen.media != "screen" || print.media != "print" {
        problems.push(format!(
            "media were {:?} and {:?}, not screen and print",
            screen.media, print.media
        ));
    }
    // The check must be able to fail: there are controls, and on screen they show.
    if screen.interactive.is_empty() || screen.interactive.iter().any(|c| !c.shown) {
        problems.push(format!(
            "controls missing on screen: {:?}",
            screen.interactive
        ));
    }
    for control in print.interactive.iter().filter(|c| c.shown) {
        problems.push(format!("printed: {}", control.element));
    }
    for finding in print.findings.iter().filter(|f| !f.shown) {
        problems.push(format!("finding {} is not printed", finding.number));
    }
    for (number, group) in print.groups.iter().enumerate() {
        if !group.shown || group.break_inside != "avoid" {
            problems.push(format!(
                "group {} prints as {:?} (shown {})",
                number + 1,
                group.break_inside,
                group.shown
            ));
        }
    }
    if print.body_color != "rgb(0, 0, 0)" {
        problems.push(format!("printed text is {}, not black", print.body_color));
    }
    // In black and white, verdicts differ by their lines' dash pattern.
    let mut dashes: BTreeMap<&str, &str> = BTreeMap::new();
    for edge in &print.edges {
        dashes.insert(&edge.verdict, &edge.dash);
    }
    let patterns: std::collections::BTreeSet<&&str> = dashes.values().collect();
    if patterns.len() != dashes.len() {
        problems.push(format!(
            "verdicts share a dash pattern in print: {dashes:?}"
        ));
    }
    problems
}

/// Writes `html` as a page in `dir`, and where DIALGUARD_HTML_REPORT_OUT
/// says (to look at it: DIALGUARD_HTML_REPORT_OUT=/tmp/report).
fn write_page(dir: &Path, name: &str, html: &str) -> PathBuf {
    let page = dir.join(name);
    std::fs::write(&page, html).expect("write the page");
    if let Ok(out) = std::env::var("DIALGUARD_HTML_REPORT_OUT") {
        let out = format!("{out}-{name}");
        std::fs::write(&out, html).unwrap_or_else(|err| panic!("{out}: {err}"));
    }
    page
}

/// All the checks of an inspected page against `report`.
fn inspection_problems(inspection: &Inspection, report: &Report) -> Vec<String> {
    let mut found = problems(&inspection.run, report.rows.len());
    found.extend(finding_problems(&inspection.run.dom, report));
    found.extend(grouping_problems(&inspection.screen, report));
    found.extend(print_problems(&inspection.screen, &inspection.print));
    found
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

    let page = write_page(dir.path(), "fixture.html", &html);
    // Broken pages, to show that the checks detect what they claim to;
    // loaded alongside the page itself (each run is mostly Chromium starting).
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
    let runs: Vec<_> = cases
        .into_iter()
        .map(|(path, expected)| {
            (
                tokio::task::spawn_blocking(move || load_in_chromium(&path)),
                expected,
            )
        })
        .collect();
    let started = Instant::now();
    let inspection = tokio::task::spawn_blocking(move || inspect_in_chromium(&page, vec![]))
        .await
        .expect("chromium runner");
    eprintln!(
        "{} loaded the report in {:?}",
        chromium.display(),
        started.elapsed()
    );

    // The rendered findings are exactly the JSON rows, hostile names
    // included (escaped in the file, intact in the DOM), grouped worst first.
    let found = inspection_problems(&inspection, &json);
    assert!(found.is_empty(), "problems with the page: {found:#?}");
    let run = &inspection.run;
    let workloads: Vec<String> = dom_findings(&run.dom)
        .into_iter()
        .map(|(_, f)| f["data-source-workload"].clone())
        .collect();
    assert!(
        workloads.iter().any(|w| w == HOSTILE_WORKLOAD),
        "{workloads:?}"
    );
    // The fixture's fixes name commands and fields in backticks.
    assert!(
        inspection
            .screen
            .groups
            .iter()
            .any(|g| !g.fix_code.is_empty()),
        "{:?}",
        inspection.screen.groups
    );
    let scripts = elements(&run.dom)
        .iter()
        .filter(|e| e.name == "script")
        .count();
    assert_eq!(scripts, 1, "only the page's own script");
    // The summary's totals and the gaps agree with the JSON.
    let all = elements(&run.dom);
    for verdict in VERDICTS {
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
    for (run, expected) in runs {
        let run = run.await.expect("chromium runner");
        let found = problems(&run, json.rows.len());
        eprintln!("broken page detected as intended: {found:#?}");
        assert!(
            found.iter().any(|problem| problem.contains(expected)),
            "a broken page went undetected (wanted {expected:?}): {found:#?}"
        );
    }
}

/// A pod name longer than the diagram's old 44-character cut, as
/// Kubernetes makes them for a StatefulSet behind a long Deployment name.
const LONG_POD: &str = "hazelcast-manager-cluster-member-statefulset-7948c5f9d-sh7rx";

/// Rows with every field the trust work adds, as the collector will fill
/// them: several causes and culprits (one with no namespace or name), one
/// culprit behind two workloads, two causes behind one Service, the worst
/// offender last by name, hostile strings in every text, a label longer
/// than the old cut and one beyond [`MAX_LABEL_CHARS`].
fn trust_report() -> Report {
    let evil = "<img src=x onerror=alert(1)>\"'&";
    let service = |namespace: &str, name: &str| Culprit {
        kind: "Service".into(),
        namespace: namespace.into(),
        name: name.into(),
        inspect: format!("kubectl -n {namespace} get service {name} -o yaml"),
    };
    let sidecar = |namespace: &str| Culprit {
        kind: "Sidecar".into(),
        namespace: namespace.into(),
        name: "default".into(),
        inspect: format!("kubectl -n {namespace} get sidecar default -o yaml"),
    };
    let catch_all_fix = |port: u16| {
        format!(
            "Do not declare port {port} on the ExternalName Service (give a ServiceEntry \
             `addresses`), or restrict it with `exportTo` or a `Sidecar` resource."
        )
    };
    let row = |source: (&str, &str), verdict: &str, count: u64, dialed: &str| ReportRow {
        source_workload: source.1.into(),
        source_namespace: source.0.into(),
        original_destination: dialed.into(),
        upstream_host: (verdict != "blackholed").then(|| "10.0.9.9:5701".into()),
        cluster: "outbound|5701||app-ext.app.svc.cluster.local".into(),
        verdict: verdict.into(),
        count,
        first_seen: "2026-11-26T07:00:21.502Z".into(),
        last_seen: "2026-11-26T09:10:02.010Z".into(),
        intended: None,
        capturing_service: String::new(),
        upstream_workload: String::new(),
        summary: format!("{}/{} dialed {dialed}", source.0, source.1),
        fix: String::new(),
        cause: Cause::Unexplained,
        cause_text: String::new(),
        culprit: None,
        would_close: 0,
        enforced: 0,
        source_pods: vec![format!("{}-0", source.1)],
    };
    let mut rows = Vec::new();

    // Sorted as the collector sorts (misrouted, then by count), which is
    // not the order of root causes.
    let mut external = row(("mesh", "zeta"), "misrouted", 90, "10.0.3.8:1521");
    external.cause = Cause::CatchAll;
    external.cause_text =
        "Listener `0.0.0.0_1521` of ServiceEntry `legacy-db.mesh-external` captured the pod IP."
            .into();
    external.culprit = Some(Culprit {
        kind: "ServiceEntry".into(),
        namespace: "mesh-external".into(),
        name: "legacy-db".into(),
        inspect: "kubectl -n mesh-external get serviceentry legacy-db -o yaml".into(),
    });
    external.fix = catch_all_fix(1521);
    external.would_close = 90;
    external.enforced = 12;
    external.source_pods = vec!["zeta-5d9f-a".into(), "zeta-5d9f-b".into()];
    rows.push(external.clone());

    let mut manager = row(("manager", "manager"), "misrouted", 40, "10.0.1.7:5701");
    manager.cause = Cause::CatchAll;
    manager.cause_text =
        "Listener `0.0.0.0_5701` of Service `app/app-ext` (ExternalName) captured the pod IP."
            .into();
    manager.culprit = Some(service("app", "app-ext"));
    manager.fix = catch_all_fix(5701);
    manager.intended = Some(Intended {
        pod: LONG_POD.into(),
        namespace: "manager".into(),
        workload: "manager".into(),
        last_seen: "2026-11-26T09:10:03.117Z".into(),
    });
    manager.upstream_workload = "idle;manager;idle;latest;Kubernetes".into();
    manager.would_close = 40;
    manager.source_pods = vec![
        "manager-7948c5f9d-sh7rx".into(),
        "manager-7948c5f9d-k2x9p".into(),
    ];
    rows.push(manager.clone());

    let mut worker = manager.clone();
    (worker.source_namespace, worker.source_workload) = ("batch".into(), "worker".into());
    worker.count = 3;
    worker.would_close = 3;
    worker.intended = None;
    worker.source_pods = vec!["worker-0".into()];
    rows.push(worker);

    let mut absurd = external.clone();
    absurd.count = 1;
    absurd.would_close = 1;
    absurd.enforced = 0;
    absurd.original_destination = "10.0.3.9:1521".into();
    absurd.upstream_workload = format!("{};mesh;x;v1;Kubernetes", "w".repeat(3 * MAX_LABEL_CHARS));
    rows.push(absurd);

    let mut external_dns = row(("jobs", "aaa-batch"), "redirected", 500, "203.0.113.5:443");
    external_dns.cause = Cause::DnsRedirection;
    external_dns.cause_text =
        "Listener `0.0.0.0_443` sent `203.0.113.5` to the addresses of `ext.example.com`.".into();
    // Found by host: the event names neither namespace nor name.
    external_dns.culprit = Some(Culprit {
        kind: "ServiceEntry".into(),
        namespace: String::new(),
        name: String::new(),
        inspect: "kubectl get serviceentries -A -o wide".into(),
    });
    external_dns.fix =
        "If `ext.example.com` is expected, allow it (`allow` by cluster or `destinationCidr`)."
            .into();
    rows.push(external_dns);

    let mut policy = row(("batch", "worker"), "blackholed", 12, "198.51.100.7:443");
    policy.cause = Cause::PolicyBlock;
    policy.cause_text =
        "`outboundTrafficPolicy: REGISTRY_ONLY` sent it to `BlackHoleCluster`.".into();
    policy.culprit = Some(sidecar("batch"));
    policy.fix =
        "Add a ServiceEntry for the host, or set `outboundTrafficPolicy` to `ALLOW_ANY`.".into();
    policy.would_close = 0;
    policy.cluster = "BlackHoleCluster".into();
    rows.push(policy.clone());

    let mut hostile = policy.clone();
    (hostile.source_namespace, hostile.source_workload) = (format!("{evil}ns"), evil.into());
    hostile.count = 7;
    hostile.cause_text = format!("Policy of `{evil}` said {evil}.");
    hostile.culprit = Some(Culprit {
        kind: format!("Sidecar{evil}"),
        namespace: evil.into(),
        name: "</script><script>alert(2)</script>".into(),
        inspect: format!("kubectl -n '{evil}' get sidecar -o yaml"),
    });
    hostile.fix = format!("Run `{evil}` and read {evil}; `</code><b>x</b>`");
    hostile.source_pods = vec![evil.into(), format!("{evil}-2")];
    hostile.summary = evil.into();
    rows.push(hostile);

    let mut own_ip = row(("manager", "manager"), "blackholed", 2, "10.0.1.6:5701");
    own_ip.cause = Cause::OwnPodIp;
    own_ip.cause_text = "The pod dialed its own IP; listener `0.0.0.0_5701` of `app/app-ext` sends that to `BlackHoleCluster`.".into();
    own_ip.culprit = Some(service("app", "app-ext"));
    own_ip.fix = catch_all_fix(5701);
    own_ip.cluster = "BlackHoleCluster".into();
    rows.push(own_ip);

    let mut unexplained = row(("manager", "manager"), "blackholed", 1, "[fd00::5]:9090");
    unexplained.cluster = "BlackHoleCluster".into();
    unexplained.fix = "Run `dialguard analyze` on the sidecar's config dump.".into();
    unexplained.source_pods = Vec::new();
    rows.push(unexplained);

    Report {
        total_rows: rows.len() as u64,
        truncated: false,
        next_cursor: None,
        rows,
        dropped_events: 0,
        rejected_events: 0,
        sampled_out_events: 0,
        filter: Default::default(),
        coverage: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_html_report_leads_to_the_fix_worst_first_on_screen_and_on_paper() {
    let report = trust_report();
    let html = render_html(&report, "2026-12-02T06:00:00.000Z");
    let dir = tempfile::tempdir().expect("tempdir");
    let page = write_page(dir.path(), "trust.html", &html);
    // The same page broken in layout, loaded alongside: the long label's
    // box at the old fixed width, and the print styles gone (with the
    // policy, whose style hash they no longer match).
    let broken = {
        let start = html
            .find("<meta http-equiv=\"Content-Security-Policy\"")
            .expect("policy");
        let end = start + html[start..].find('>').expect("end of meta") + 1;
        let mut text = format!("{}{}", &html[..start], &html[end..]);
        let node = text
            .find(&format!("<title>10.0.1.7:5701\npod manager/{LONG_POD}"))
            .expect("long label");
        let width = node + text[node..].find("width=\"").expect("box width") + "width=\"".len();
        let digits = text[width..].find('"').expect("end of width");
        text.replace_range(width..width + digits, "340");
        assert!(text.contains("@media print {"));
        write_page(
            dir.path(),
            "trust-broken.html",
            &text.replace("@media print {", "@media speech {"),
        )
    };
    let broken = tokio::task::spawn_blocking(move || inspect_in_chromium(&broken, vec![]));
    // The text filter, typed as a user would: a group's culprit shows all
    // its rows, and the group alone.
    let needle = "legacy-db";
    let filter = format!(
        "(() => {{
          const search = document.getElementById('search');
          search.value = {};
          search.dispatchEvent(new Event('input'));
          return {{
            findings: Array.from(document.querySelectorAll('[data-finding]'))
              .filter((f) => !f.hidden).map((f) => f.getAttribute('data-finding')),
            groups: Array.from(document.querySelectorAll('[data-group]')).filter((g) => !g.hidden).length,
            shown: document.getElementById('shown').textContent,
          }};
        }})()",
        serde_json::to_string(needle).expect("a JS string")
    );
    let inspection = tokio::task::spawn_blocking(move || inspect_in_chromium(&page, vec![filter]))
        .await
        .expect("chromium runner");
    let found = inspection_problems(&inspection, &report);
    assert!(found.is_empty(), "problems with the page: {found:#?}");

    let matching: Vec<String> = (1..=report.rows.len())
        .filter(|n| {
            report.rows[n - 1]
                .culprit
                .as_ref()
                .is_some_and(|c| c.name == needle)
        })
        .map(|n| n.to_string())
        .collect();
    assert!(matching.len() > 1, "the needle names a group of rows");
    assert_eq!(
        inspection.then[0],
        serde_json::json!({
            "findings": matching,
            "groups": 1,
            "shown": format!("{} of {} shown", matching.len(), report.rows.len()),
        })
    );

    // --- The checks detect what they claim to. -----------------------------
    let broken = broken.await.expect("chromium runner");
    let found = inspection_problems(&broken, &report);
    for expected in [
        format!("label \"pod manager/{LONG_POD}\" overflows its box"),
        "printed: <input id=\"search\"".to_string(),
        "printed: <button".to_string(),
        "prints as \"auto\"".to_string(),
        "printed text is rgb(31, 35, 40), not black".to_string(),
    ] {
        assert!(
            found.iter().any(|problem| problem.contains(&expected)),
            "a broken page went undetected (wanted {expected:?}): {found:#?}"
        );
    }
    // Faults in what the page shows, made in what the probe read.
    let faults: [(&str, ProbeFault); 6] = [
        ("is worse than the group before it", |p| p.groups.reverse()),
        ("shows a literal backtick", |p| {
            let fix = p.groups[0].fix.get_or_insert_default();
            fix.push('`');
        }),
        ("<code>", |p| {
            p.groups[1].fix_code.pop();
        }),
        ("names \"Service app/app\" to change", |p| {
            p.groups[1].culprit = Some("Service app/app".into())
        }),
        ("shows inspect command", |p| p.groups[1].inspect = None),
        ("shows pods", |p| p.findings[0].pods.reverse()),
    ];
    for (expected, fault) in faults {
        let mut probe = inspection.screen.clone();
        fault(&mut probe);
        let found = grouping_problems(&probe, &report);
        assert!(
            found.iter().any(|problem| problem.contains(expected)),
            "a fault went undetected (wanted {expected:?}): {found:#?}"
        );
    }

    // Rows of one culprit from two workloads share a group; one Service
    // behind two causes makes two groups.
    let groups = &inspection.screen.groups;
    assert!(
        groups
            .iter()
            .any(|g| g.findings.len() == 2 && g.culprit.as_deref() == Some("Service app/app-ext"))
    );
    assert_eq!(
        groups
            .iter()
            .filter(|g| g.culprit.as_deref() == Some("Service app/app-ext"))
            .count(),
        2
    );
    // The worst offender's group leads though its workload sorts last.
    let worst = report
        .rows
        .iter()
        .max_by_key(|r| (r.verdict == "misrouted", r.count))
        .unwrap();
    assert_eq!(
        groups[0].culprit,
        worst
            .culprit
            .as_ref()
            .map(|c| format!("{} {}/{}", c.kind, c.namespace, c.name))
    );
    assert_eq!(
        inspection.screen.flow_sources.first(),
        Some(&format!(
            "{}/{}",
            worst.source_namespace, worst.source_workload
        ))
    );
    // Hostile code spans are code, as text.
    let hostile_fix = &report
        .rows
        .iter()
        .find(|r| r.source_workload.starts_with("<img"))
        .unwrap()
        .fix;
    assert!(
        groups
            .iter()
            .any(|g| g.fix_code == code_spans(hostile_fix) && g.fix_code.len() == 2)
    );

    // The long label is drawn whole, inside its box; the absurd one is cut
    // with an ellipsis and whole in its tooltip.
    let long = format!("pod manager/{LONG_POD}");
    assert!(long.chars().count() > 44);
    let lines: Vec<&ProbedLine> = inspection
        .screen
        .labels
        .iter()
        .flat_map(|l| &l.lines)
        .collect();
    assert!(
        lines.iter().any(|line| line.text == long && line.inside),
        "{long:?} not drawn whole: {lines:?}"
    );
    let absurd = format!("workload mesh/{}", "w".repeat(3 * MAX_LABEL_CHARS));
    let cut = inspection
        .screen
        .labels
        .iter()
        .find(|l| l.title.contains(&absurd))
        .unwrap_or_else(|| panic!("no tooltip with the absurd label"));
    assert!(
        cut.lines.iter().any(|line| line.text.ends_with('…')
            && line.text.chars().count() == MAX_LABEL_CHARS
            && absurd.starts_with(line.text.trim_end_matches('…'))),
        "{cut:?}"
    );
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
