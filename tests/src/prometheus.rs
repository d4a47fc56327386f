//! A real Prometheus server for end-to-end tests.
//!
//! [`Prometheus::start`] runs the Debian `prometheus` binary
//! (`/usr/bin/prometheus`, or `$PROMETHEUS_BIN`) on a free loopback port with
//! a generated config: the given static scrape targets, the given rule files,
//! a 1 s scrape and rule-evaluation interval, and storage in a temp dir. It
//! returns once `/-/ready` answers 200. Queries go to the HTTP API
//! (`/api/v1/query`) over a minimal HTTP/1.1 client on `std::net::TcpStream`.
//! The server is killed when the value is dropped.
//!
//! ```no_run
//! use std::time::Duration;
//! use keyproof_tests::prometheus::{Prometheus, PrometheusOptions};
//!
//! let prom = Prometheus::start(
//!     PrometheusOptions::new()
//!         .job("keyproof", ["127.0.0.1:15090"])
//!         .rule_file("deploy/prometheus/keyproof-rules.yaml"),
//! )
//! .unwrap();
//! let replays = prom
//!     .wait_for_query(
//!         r#"sum(keyproof_stepup_verifications_total{result="replay"})"#,
//!         |v| v >= 1.0,
//!         Duration::from_secs(20),
//!     )
//!     .unwrap();
//! prom.wait_for_alert_firing("KeyproofStepUpReplay", Duration::from_secs(20)).unwrap();
//! # let _ = replays;
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Where the Prometheus binary is: `$PROMETHEUS_BIN`, else
/// `/usr/bin/prometheus` (Debian's package), else `prometheus` on PATH.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PROMETHEUS_BIN") {
        let p = PathBuf::from(p);
        return p.exists().then_some(p);
    }
    let debian = PathBuf::from("/usr/bin/prometheus");
    if debian.exists() {
        return Some(debian);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("prometheus"))
            .find(|p| p.is_file())
    })
}

/// One static scrape job.
#[derive(Debug, Clone)]
pub struct ScrapeJob {
    /// The `job` label.
    pub name: String,
    /// `host:port` targets. The literal target `self` means this Prometheus
    /// server's own address (its port is only known at start).
    pub targets: Vec<String>,
    /// Metrics path, `/metrics` by default.
    pub metrics_path: String,
}

/// What to start Prometheus with.
#[derive(Debug, Clone)]
pub struct PrometheusOptions {
    /// Static scrape jobs.
    pub jobs: Vec<ScrapeJob>,
    /// Rule files (alerting or recording), absolute or relative to the
    /// current directory; they are referenced by absolute path.
    pub rule_files: Vec<PathBuf>,
    /// Scrape interval (default 1 s).
    pub scrape_interval: Duration,
    /// Rule evaluation interval (default 1 s).
    pub evaluation_interval: Duration,
    /// How long to wait for `/-/ready` (default 30 s).
    pub ready_timeout: Duration,
}

impl Default for PrometheusOptions {
    fn default() -> Self {
        PrometheusOptions {
            jobs: Vec::new(),
            rule_files: Vec::new(),
            scrape_interval: Duration::from_secs(1),
            evaluation_interval: Duration::from_secs(1),
            ready_timeout: Duration::from_secs(30),
        }
    }
}

impl PrometheusOptions {
    /// Defaults: no targets, no rules, 1 s intervals.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a scrape job with `host:port` targets (`self` = this server).
    pub fn job<I, S>(mut self, name: &str, targets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.jobs.push(ScrapeJob {
            name: name.to_owned(),
            targets: targets.into_iter().map(Into::into).collect(),
            metrics_path: "/metrics".to_owned(),
        });
        self
    }

    /// Adds a rule file.
    pub fn rule_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.rule_files.push(path.into());
        self
    }

    /// Sets both the scrape and the evaluation interval.
    pub fn interval(mut self, every: Duration) -> Self {
        self.scrape_interval = every;
        self.evaluation_interval = every;
        self
    }
}

/// One sample of an instant-query result.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Series labels, `__name__` included when the result keeps it.
    pub labels: BTreeMap<String, String>,
    /// The value (`NaN`, `+Inf` and `-Inf` are parsed too).
    pub value: f64,
}

/// A running Prometheus server, killed on drop.
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// A Prometheus duration, in milliseconds (`1000ms` is valid).
fn duration_str(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// YAML double-quoted string (JSON string syntax is valid YAML).
fn yq(s: &str) -> String {
    serde_json::to_string(s).expect("string to JSON")
}

impl Prometheus {
    /// Starts Prometheus and waits until it is ready. Retries with another
    /// port when the chosen one was taken in the meantime.
    pub fn start(opts: PrometheusOptions) -> Result<Prometheus> {
        let bin = binary().ok_or_else(|| {
            anyhow!("prometheus not found (apt-get install prometheus, or set PROMETHEUS_BIN)")
        })?;
        let mut last_err = None;
        for _ in 0..3 {
            match Self::start_once(&bin, &opts) {
                Ok(p) => return Ok(p),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn start_once(bin: &Path, opts: &PrometheusOptions) -> Result<Prometheus> {
        let dir = tempfile::Builder::new()
            .prefix("keyproof-prometheus-")
            .tempdir()
            .context("temp dir for Prometheus")?;
        let port = crate::free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, Self::render_config(opts, addr)?)
            .with_context(|| format!("writing {}", config.display()))?;
        let data = dir.path().join("data");
        let log_path = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path).context("Prometheus log file")?;
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--storage.tsdb.retention.time=1d")
            .arg("--log.level=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("Prometheus log file")?)
            .stderr(log)
            .current_dir(dir.path())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut prom = Prometheus { child, addr, dir };
        prom.wait_ready(opts.ready_timeout)?;
        Ok(prom)
    }

    fn render_config(opts: &PrometheusOptions, addr: SocketAddr) -> Result<String> {
        let mut y = String::new();
        writeln!(y, "global:")?;
        writeln!(
            y,
            "  scrape_interval: {}",
            duration_str(opts.scrape_interval)
        )?;
        writeln!(
            y,
            "  scrape_timeout: {}",
            duration_str(opts.scrape_interval)
        )?;
        writeln!(
            y,
            "  evaluation_interval: {}",
            duration_str(opts.evaluation_interval)
        )?;
        if !opts.rule_files.is_empty() {
            writeln!(y, "rule_files:")?;
            for f in &opts.rule_files {
                let abs = std::fs::canonicalize(f)
                    .with_context(|| format!("rule file {}", f.display()))?;
                writeln!(y, "  - {}", yq(&abs.to_string_lossy()))?;
            }
        }
        writeln!(y, "scrape_configs:")?;
        if opts.jobs.is_empty() {
            writeln!(y, "  []")?;
        }
        for job in &opts.jobs {
            writeln!(y, "  - job_name: {}", yq(&job.name))?;
            writeln!(y, "    metrics_path: {}", yq(&job.metrics_path))?;
            writeln!(y, "    static_configs:")?;
            writeln!(y, "      - targets:")?;
            for t in &job.targets {
                let t = if t == "self" {
                    addr.to_string()
                } else {
                    t.clone()
                };
                writeln!(y, "          - {}", yq(&t))?;
            }
        }
        Ok(y)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "prometheus exited with {status} before it was ready; log:\n{}",
                    self.log()
                );
            }
            if let Ok((200, _)) = http_get(self.addr, "/-/ready", Duration::from_secs(2)) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "prometheus not ready after {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The generated config and data live here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What Prometheus has logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// A GET on the server; returns (status, body).
    pub fn get(&self, path_and_query: &str) -> Result<(u16, String)> {
        http_get(self.addr, path_and_query, Duration::from_secs(10))
    }

    /// Instant query; every sample of a vector or scalar result.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let (status, body) = self.get(&format!("/api/v1/query?query={}", urlencode(promql)))?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("query {promql:?}: HTTP {status}, not JSON: {body}"))?;
        if v["status"] != "success" {
            bail!(
                "query {promql:?}: HTTP {status}: {} {}",
                v["errorType"],
                v["error"]
            );
        }
        let data = &v["data"];
        let parse_value = |pair: &serde_json::Value| -> Result<f64> {
            let s = pair
                .get(1)
                .and_then(|x| x.as_str())
                .ok_or_else(|| anyhow!("query {promql:?}: unexpected value {pair}"))?;
            parse_float(s).ok_or_else(|| anyhow!("query {promql:?}: bad number {s:?}"))
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .ok_or_else(|| anyhow!("query {promql:?}: no result array"))?
                .iter()
                .map(|s| {
                    let labels = s["metric"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| {
                                    (k.clone(), v.as_str().unwrap_or_default().to_owned())
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    Ok(Sample {
                        labels,
                        value: parse_value(&s["value"])?,
                    })
                })
                .collect(),
            Some("scalar") => Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: parse_value(&data["result"])?,
            }]),
            other => {
                bail!("query {promql:?}: unsupported result type {other:?} (use an instant vector)")
            }
        }
    }

    /// The value of the first sample, or `None` for an empty result.
    pub fn query_value(&self, promql: &str) -> Result<Option<f64>> {
        Ok(self.query(promql)?.first().map(|s| s.value))
    }

    /// Polls `promql` (every 250 ms) until its first sample satisfies
    /// `predicate`; returns that value. Fails after `timeout` with the last
    /// value seen and the server's log.
    pub fn wait_for_query(
        &self,
        promql: &str,
        predicate: impl Fn(f64) -> bool,
        timeout: Duration,
    ) -> Result<f64> {
        let start = Instant::now();
        let mut last: Result<Option<f64>> = Ok(None);
        while start.elapsed() < timeout {
            last = self.query_value(promql);
            if let Ok(Some(v)) = last {
                if predicate(v) {
                    return Ok(v);
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!(
            "{promql:?} did not reach the expected value within {timeout:?}; last result: {last:?}\n\
             targets: {}\nprometheus log (tail):\n{}",
            self.get("/api/v1/targets").map(|(_, b)| b).unwrap_or_default(),
            tail(&self.log(), 40)
        )
    }

    /// The label sets of the firing instances of `alertname`
    /// (`ALERTS{alertname="...",alertstate="firing"}`); empty if none.
    pub fn firing_alerts(&self, alertname: &str) -> Result<Vec<BTreeMap<String, String>>> {
        let q = format!(
            "ALERTS{{alertname={},alertstate=\"firing\"}}",
            serde_json::to_string(alertname).expect("string to JSON")
        );
        Ok(self.query(&q)?.into_iter().map(|s| s.labels).collect())
    }

    /// True when `alertname` has at least one firing instance.
    pub fn alert_firing(&self, alertname: &str) -> Result<bool> {
        Ok(!self.firing_alerts(alertname)?.is_empty())
    }

    /// Waits until `alertname` is firing; returns the firing label sets.
    pub fn wait_for_alert_firing(
        &self,
        alertname: &str,
        timeout: Duration,
    ) -> Result<Vec<BTreeMap<String, String>>> {
        let start = Instant::now();
        loop {
            let firing = self.firing_alerts(alertname)?;
            if !firing.is_empty() {
                return Ok(firing);
            }
            if start.elapsed() > timeout {
                bail!(
                    "alert {alertname} not firing after {timeout:?}; ALERTS now: {:?}\nrules: {}",
                    self.query("ALERTS").unwrap_or_default(),
                    self.get("/api/v1/rules")
                        .map(|(_, b)| b)
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn parse_float(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A minimal HTTP/1.1 GET (`Connection: close`); returns (status, body).
/// Handles `Content-Length`, chunked and read-to-close bodies.
pub fn http_get(
    addr: SocketAddr,
    path_and_query: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading response from {addr}"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response from {addr}"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line from {addr}: {head}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body[..n.min(body.len())].to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunked body"))?;
        let size_str = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| anyhow!("bad chunk size {size_str:?}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urlencode_promql() {
        assert_eq!(
            urlencode(r#"up{job="self"} == 1"#),
            "up%7Bjob%3D%22self%22%7D%20%3D%3D%201"
        );
    }

    #[test]
    fn dechunk_body() {
        assert_eq!(
            dechunk(b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n").unwrap(),
            b"Wikipedia"
        );
    }

    #[test]
    fn config_render() {
        let opts = PrometheusOptions::new()
            .job("self", ["self"])
            .job("keyproof", ["127.0.0.1:15090", "127.0.0.1:15091"]);
        let y = Prometheus::render_config(&opts, ([127, 0, 0, 1], 9999).into()).unwrap();
        assert!(y.contains("scrape_interval: 1000ms"), "{y}");
        assert!(y.contains("- \"127.0.0.1:9999\""), "{y}");
        assert!(y.contains("- \"127.0.0.1:15091\""), "{y}");
        assert_eq!(duration_str(Duration::from_millis(500)), "500ms");
    }
}
