//! Metrics and JSON logs on a farm: a real coordinator process (SQLite file) and a real worker
//! process (`--metrics-addr 127.0.0.1:0`, `--log-format json`, its bound address read from its
//! JSON log) render a sweep of the tiny reference model. Both `/metrics` endpoints are scraped
//! with plain HTTP GETs during and after the sweep: the counters only grow, and at the end the
//! coordinator's completes, the worker's images and its phase histograms' counts all equal the
//! completed cells; the coordinator's cells-by-state gauges equal what `kiln query` says; every
//! name follows Prometheus's conventions.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::spawn;
use crate::util::{Worker, fixtures, json_rows, kiln, worker_command};

const SWEEP: &str = r#"
name = "metered"
model = "tiny-sd15"
prompt = "a fox"
size = "64x64"
steps = 4
seeds = [1, 2, 3, 4, 5, 6]
"#;

/// The body of `GET http://{addr}/metrics`, after checking the status and content type.
fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // HTTP/1.0: the server closes the connection after the body, which is not chunked.
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    body.to_owned()
}

/// Samples by series (name with labels as exposed), and each family's TYPE and UNIT.
struct Exposition {
    samples: BTreeMap<String, f64>,
    types: HashMap<String, String>,
    units: HashMap<String, String>,
}

fn parse(text: &str) -> Exposition {
    let mut e = Exposition {
        samples: BTreeMap::new(),
        types: HashMap::new(),
        units: HashMap::new(),
    };
    assert!(text.ends_with("# EOF\n"), "{text}");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            e.types.insert(name.into(), kind.into());
        } else if let Some(rest) = line.strip_prefix("# UNIT ") {
            let (name, unit) = rest.split_once(' ').unwrap();
            e.units.insert(name.into(), unit.into());
        } else if !line.starts_with('#') {
            let (series, value) = line.rsplit_once(' ').unwrap();
            e.samples.insert(series.into(), value.parse().unwrap());
        }
    }
    e
}

impl Exposition {
    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("{series} missing: {:?}", self.samples.keys()))
    }

    /// Every family and sample name follows Prometheus's conventions: a `kiln_` prefix,
    /// counters' samples end in `_total`, histograms are of seconds, a family with a unit ends
    /// in it, and only base units (seconds, bytes) are used.
    fn check_names(&self) {
        for (family, kind) in &self.types {
            assert!(family.starts_with("kiln_"), "{family}");
            assert!(
                family
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{family}"
            );
            for bad in ["_ms", "milli", "_mib", "_gib", "_kb", "_mb", "minutes"] {
                assert!(!family.contains(bad), "{family}: not a base unit");
            }
            match kind.as_str() {
                "counter" => assert!(!family.ends_with("_total"), "{family}"),
                "histogram" => assert!(family.ends_with("_seconds"), "{family}"),
                "gauge" => assert!(!family.ends_with("_total"), "{family}"),
                other => panic!("{family}: unexpected type {other}"),
            }
            if let Some(unit) = self.units.get(family) {
                assert!(matches!(unit.as_str(), "seconds" | "bytes"), "{family}");
                assert!(family.ends_with(&format!("_{unit}")), "{family}");
            } else {
                assert!(
                    !family.ends_with("_seconds") && !family.ends_with("_bytes"),
                    "{family} has no UNIT"
                );
            }
        }
        for series in self.samples.keys() {
            let name = series.split('{').next().unwrap();
            let (family, kind) = self
                .types
                .iter()
                .filter(|(f, _)| name.starts_with(f.as_str()))
                .max_by_key(|(f, _)| f.len())
                .unwrap_or_else(|| panic!("{name} has no TYPE"));
            let suffix = &name[family.len()..];
            let allowed: &[&str] = match kind.as_str() {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            assert!(allowed.contains(&suffix), "{name} ({kind})");
        }
    }
}

/// The address the worker logged for its metrics, from its JSON log at `path`.
fn metrics_addr(path: &std::path::Path, worker: &mut Worker) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        for line in log.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            assert!(
                v["timestamp"].is_string() && v["level"].is_string(),
                "{line}"
            );
            if v["fields"]["message"] == "metrics listening" {
                return v["fields"]["addr"].as_str().unwrap().to_owned();
            }
        }
        assert!(
            worker.0.try_wait().unwrap().is_none(),
            "the worker exited: {log}"
        );
        assert!(
            Instant::now() < deadline,
            "no metrics address logged: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn both_endpoints_count_a_sweep_as_its_cells_complete() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let log_path = dir.path().join("worker.log");
    let mut worker = Worker(
        worker_command(&c.addr, &dir.path().join("out"), &[&fixtures()])
            .args(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
            .env("KILN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let worker_addr = metrics_addr(&log_path, &mut worker);

    let before = parse(&scrape(&c.addr));
    assert_eq!(before.get("kiln_coordinator_completes_total"), 0.0);
    let idle = parse(&scrape(&worker_addr));
    assert_eq!(idle.get("kiln_worker_images_total"), 0.0);
    assert_eq!(idle.get("kiln_worker_draining"), 0.0);

    let file = dir.path().join("metered.toml");
    std::fs::write(&file, SWEEP).unwrap();
    kiln(&c.addr, &["submit", file.to_str().unwrap()]);

    // Scrape both while the sweep renders: the counters never go back.
    let watched = [
        (c.addr.as_str(), "kiln_coordinator_completes_total"),
        (c.addr.as_str(), "kiln_coordinator_leases_total"),
        (worker_addr.as_str(), "kiln_worker_images_total"),
    ];
    let mut last = [0.0; 3];
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        for (i, (addr, series)) in watched.iter().enumerate() {
            let v = parse(&scrape(addr)).get(series);
            assert!(v >= last[i], "{series} went from {} to {v}", last[i]);
            last[i] = v;
        }
        seen.insert(last[0] as u64);
        if last[0] == 6.0 && last[2] == 6.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sweep did not finish: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(last[1] >= 6.0, "leases: {}", last[1]);

    let farm = parse(&scrape(&c.addr));
    farm.check_names();
    assert_eq!(farm.get("kiln_coordinator_completes_total"), 6.0);
    assert_eq!(
        farm.get("kiln_coordinator_failures_total{class=\"bad_input\"}"),
        0.0
    );
    assert_eq!(farm.get("kiln_coordinator_workers{state=\"online\"}"), 1.0);
    assert_eq!(
        farm.get("kiln_coordinator_oldest_available_age_seconds"),
        0.0
    );
    // The cells-by-state gauges say what `kiln query` says.
    let rows = json_rows(&kiln(
        &c.addr,
        &["query", r#"sweep = "metered""#, "--format", "json"],
    ));
    let sweep = rows[0]["sweep"].as_i64().unwrap();
    let mut states: HashMap<String, f64> = HashMap::new();
    for r in &rows {
        *states
            .entry(r["state"].as_str().unwrap().into())
            .or_default() += 1.0;
    }
    assert_eq!(states.get("completed"), Some(&6.0), "{rows:?}");
    for state in [
        "available",
        "scheduled",
        "running",
        "retryable",
        "held",
        "completed",
        "cancelled",
        "discarded",
    ] {
        let series = format!(
            "kiln_coordinator_sweep_cells{{sweep=\"{sweep}\",name=\"metered\",state=\"{state}\"}}"
        );
        assert_eq!(
            farm.get(&series),
            states.get(state).copied().unwrap_or(0.0),
            "{state}"
        );
    }

    let w = parse(&scrape(&worker_addr));
    w.check_names();
    assert_eq!(w.get("kiln_worker_images_total"), 6.0);
    for phase in ["load", "text_encode", "unet", "vae", "encode", "upload"] {
        let count = format!("kiln_worker_phase_seconds_count{{phase=\"{phase}\"}}");
        assert_eq!(w.get(&count), 6.0, "{phase}");
        let inf = format!("kiln_worker_phase_seconds_bucket{{le=\"+Inf\",phase=\"{phase}\"}}");
        assert_eq!(w.get(&inf), 6.0, "{phase}");
    }
    assert!(w.get("kiln_worker_phase_seconds_sum{phase=\"unet\"}") > 0.0);
    // Every render asked the cache once: found its pipeline or loaded it.
    let asked = w.get("kiln_worker_pipeline_cache_hits_total")
        + w.get("kiln_worker_pipeline_cache_misses_total");
    assert_eq!(asked, 6.0);
    assert!(w.get("kiln_worker_pipeline_cache_bytes{memory=\"host\"}") > 0.0);
    assert!(w.get("kiln_worker_device_memory_bytes") > 0.0);
    assert!(
        seen.len() >= 2,
        "completes seen while the sweep ran: {seen:?}"
    );
}
