//! Prometheus metrics (`metrics_listen`): the exposition parses with a Prometheus text parser
//! and holds what the node did; and a real Prometheus server (Debian's `prometheus`, which
//! `ci/setup.sh` installs) scrapes a live pair and, through its HTTP API, sees the primary go
//! degraded during an outage and come back.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mirror::Mirror;

mod common;
use common::{failover_node, free_port};

/// A plain HTTP/1.1 GET; returns the status code and the body (`None` if nothing answers).
fn try_http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|| panic!("nothing answers at {addr}"))
}

fn scrape(m: &Mirror) -> prometheus_parse::Scrape {
    let (status, body) = http_get(m.metrics_addr().unwrap(), "/metrics");
    assert_eq!(status, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("the exposition parses")
}

fn value(s: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    let sample = s
        .samples
        .iter()
        .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"));
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name} is {other:?}"),
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pair whose nodes serve metrics on free loopback ports.
fn pair(dir: &std::path::Path) -> (Mirror, Mirror, String, String) {
    let (pa, pb) = (free_port(), free_port());
    let (la, lb) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let opts = [
        ("on_peer_loss", "continue"),
        ("metrics_listen", "127.0.0.1:0"),
    ];
    let b = failover_node(dir, "b", "backup", &lb, &la, &opts);
    let a = failover_node(dir, "a", "primary", &la, &lb, &opts);
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    (a, b, la, lb)
}

#[test]
fn the_exposition_parses_and_counts_what_the_node_did() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, la, lb) = pair(dir.path());
    for i in 0..20u64 {
        a.write(i * 100, &[7u8; 100]).unwrap();
    }
    let s = scrape(&a);
    assert_eq!(value(&s, "mirror_role", Some(("role", "primary"))), 1.0);
    assert_eq!(value(&s, "mirror_role", Some(("role", "backup"))), 0.0);
    assert_eq!(
        value(&s, "mirror_phase", Some(("phase", "synchronous"))),
        1.0
    );
    assert_eq!(value(&s, "mirror_degraded", None), 0.0);
    assert!(value(&s, "mirror_writes_total", None) >= 20.0);
    assert_eq!(value(&s, "mirror_write_bytes_total", None), 2000.0);
    assert!(value(&s, "mirror_connections_total", None) >= 1.0);
    assert!(value(&s, "mirror_term", None) > 0.0);
    assert!(value(&s, "mirror_queue_capacity_bytes", None) > 0.0);
    // The histogram: 20 synchronous writes, cumulative buckets ending at +Inf.
    let h = s
        .samples
        .iter()
        .find(|x| x.metric == "mirror_write_latency_seconds")
        .expect("the latency histogram");
    let prometheus_parse::Value::Histogram(buckets) = &h.value else {
        panic!("{:?}", h.value)
    };
    let last = buckets.last().unwrap();
    assert!(
        last.less_than.is_infinite() && last.count == 20.0,
        "{buckets:?}"
    );
    assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
    // An outage and a recovery show up in the counters.
    b.close().unwrap();
    drop(b);
    for i in 0..5u64 {
        a.write(i * 100, &[8u8; 100]).unwrap();
    }
    assert_eq!(value(&scrape(&a), "mirror_degraded", None), 1.0);
    let b = failover_node(
        dir.path(),
        "b",
        "backup",
        &lb,
        &la,
        &[("metrics_listen", "127.0.0.1:0")],
    );
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    let s = scrape(&a);
    assert_eq!(value(&s, "mirror_degraded", None), 0.0);
    assert!(value(&s, "mirror_recovery_records_total", None) >= 5.0);
    assert!(value(&s, "mirror_recovery_bytes_total", None) >= 500.0);
    assert!(value(&s, "mirror_connections_total", None) >= 2.0);
    // A stranger refused by the backup is counted there.
    let mut garbage = TcpStream::connect(lb.parse::<SocketAddr>().unwrap()).unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    wait_until("the refusal to be counted", || {
        value(&scrape(&b), "mirror_rejected_peers_total", None) >= 1.0
    });
    // Only /metrics is served.
    let (status, _) = http_get(a.metrics_addr().unwrap(), "/other");
    assert_eq!(status, 404);
}

/// A Prometheus server on a free port, scraping `targets` every 500 ms.
struct Prometheus {
    child: Child,
    api: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[SocketAddr]) -> Option<Prometheus> {
        let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let Some(bin) = bin else {
            eprintln!("skipping: no prometheus binary (ci/setup.sh installs Debian's package)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\nscrape_configs:\n  - job_name: mirror\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={api}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Some(Prometheus {
            child,
            api,
            _dir: dir,
        })
    }

    /// The values of an instant query, by the `instance` label.
    fn query(&self, q: &str) -> Vec<(String, f64)> {
        let encoded: String = q
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let Some((_, body)) = try_http_get(self.api, &format!("/api/v1/query?query={encoded}"))
        else {
            return Vec::new();
        };
        // The body may be chunked: the JSON object starts at the first `{`.
        let Some(start) = body.find('{') else {
            return Vec::new();
        };
        let end = body.rfind('}').map_or(body.len(), |e| e + 1);
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&body[start..end]) else {
            return Vec::new();
        };
        v["data"]["result"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| {
                        let instance = r["metric"]["instance"].as_str()?.to_string();
                        let value = r["value"][1].as_str()?.parse().ok()?;
                        Some((instance, value))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_prometheus_server_sees_the_pair_go_degraded_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, la, lb) = pair(dir.path());
    let a_metrics = a.metrics_addr().unwrap();
    let Some(prom) = Prometheus::start(&[a_metrics, b.metrics_addr().unwrap()]) else {
        return;
    };
    let primary = a_metrics.to_string();
    let degraded = |prom: &Prometheus| {
        prom.query("mirror_degraded")
            .into_iter()
            .find(|(i, _)| *i == primary)
            .map(|(_, v)| v)
    };
    wait_until("Prometheus to scrape the pair, synchronous", || {
        prom.query("mirror_phase{phase=\"synchronous\"} == 1").len() == 2
            && degraded(&prom) == Some(0.0)
    });
    // The backup goes away; the primary writes alone.
    b.close().unwrap();
    drop(b);
    a.write(0, b"alone").unwrap();
    wait_until("Prometheus to see the primary degraded", || {
        degraded(&prom) == Some(1.0)
    });
    // It comes back and catches up.
    let _b = failover_node(
        dir.path(),
        "b",
        "backup",
        &lb,
        &la,
        &[("metrics_listen", "127.0.0.1:0")],
    );
    a.wait_synchronous(Duration::from_secs(20)).unwrap();
    wait_until("Prometheus to see the primary mirror again", || {
        degraded(&prom) == Some(0.0)
    });
    let writes = prom.query("mirror_writes_total");
    assert!(
        writes.iter().any(|(i, v)| *i == primary && *v >= 1.0),
        "{writes:?}"
    );
}
