//! `farcer loadtest`: starts `farcer serve` on the loopback (or uses one already running
//! there), loads it with concurrent clients, and writes what it measured.

use anyhow::{bail, Context, Result};
use clap::Args;
use farcer::data::spec::DataSpec;
use farcer::data::Scope;
use farcer::plot::{self, Series};
use farcer_serve::loadtest::{self, LoadConfig, LoadReport};
use image::Rgb;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[derive(Args)]
pub struct LoadtestArgs {
    /// A server already running on the loopback; without it, `farcer serve` is started on a
    /// free loopback port with the arguments after `--` and stopped at the end.
    #[arg(long)]
    addr: Option<String>,
    /// The dialogues to send (a data spec, e.g. jsonl:runs/demo/data or meld:<dir>).
    #[arg(long)]
    data: String,
    #[arg(long, default_value = "test")]
    split: String,
    /// Concurrent clients, each on its own connection.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// At most this many requests in all.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// No request starts after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Share of client rounds that run a live session instead of one predict call.
    #[arg(long, default_value_t = 0.5)]
    session_share: f64,
    /// Utterances added per session.
    #[arg(long, default_value_t = 5)]
    session_utterances: usize,
    /// Scope of the predict calls.
    #[arg(long, default_value_t = Scope::Last)]
    scope: Scope,
    #[arg(long, env = "FARCER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seconds a call may go unanswered before it counts as a transport failure.
    #[arg(long, default_value_t = 150.0)]
    timeout: f64,
    /// Where loadtest.json, loadtest.md and loadtest.png go.
    #[arg(long, default_value = "runs/loadtest")]
    out: PathBuf,
    /// Arguments for the `farcer serve` this starts (after `--`).
    #[arg(last = true)]
    serve_args: Vec<String>,
}

/// A `farcer serve` child, stopped with SIGTERM when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn start_server(args: &[String]) -> Result<(Server, String)> {
    let exe = std::env::current_exe().context("finding the farcer binary")?;
    let mut child = Command::new(exe)
        .arg("serve")
        .args(args)
        .args(["--addr", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .context("starting farcer serve")?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let server = Server(child);
    let mut said = Vec::new();
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(a) = l.strip_prefix("listening on http://") {
                    break a.to_string();
                }
                said.push(l);
            }
            _ => bail!(
                "farcer serve stopped before listening:\n{}",
                said.join("\n")
            ),
        }
    };
    // Keep draining so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((server, addr))
}

pub fn run(a: LoadtestArgs) -> Result<()> {
    let spec: DataSpec = a.data.parse()?;
    let data = spec.load(&a.split, a.seed)?;
    let mut dialogues = Vec::new();
    for d in &data.dialogues {
        let utts = d
            .utterances
            .iter()
            .map(loadtest::request_utterance)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("dialogue {} of {}", d.id, a.data))?;
        dialogues.push(utts);
    }
    let (_server, addr) = match &a.addr {
        Some(addr) => {
            if !a.serve_args.is_empty() {
                bail!("--addr names a running server: arguments after -- are for a server this starts");
            }
            (None, addr.clone())
        }
        None => {
            let (s, addr) = start_server(&a.serve_args)?;
            (Some(s), addr)
        }
    };
    let addr = addr
        .parse()
        .with_context(|| format!("--addr {addr}: not an IP address and port"))?;
    eprintln!(
        "load test of http://{addr}: {} clients, at most {} requests or {} s, {:.0}% sessions",
        a.clients,
        a.requests,
        a.seconds,
        100.0 * a.session_share
    );
    let secs = |v: f64, flag: &str| {
        Duration::try_from_secs_f64(v)
            .map_err(|_| anyhow::anyhow!("--{flag} {v}: give a number of seconds, 0 or more"))
    };
    let report = loadtest::run_blocking(LoadConfig {
        addr,
        clients: a.clients,
        max_requests: a.requests,
        max_duration: secs(a.seconds, "seconds")?,
        request_timeout: secs(a.timeout, "timeout")?,
        session_share: a.session_share.clamp(0.0, 1.0),
        session_utterances: a.session_utterances,
        scope: a.scope.to_string(),
        api_key: a.api_key.filter(|k| !k.is_empty()),
        dialogues,
        seed: a.seed,
    })
    .map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}", a.out.display()))?;
    farcer::util::write_json_atomic(&a.out.join("loadtest.json"), &report)?;
    let md = report.markdown(&format!(
        "Load test: {} clients on {} ({} split)",
        report.clients, a.data, a.split
    ));
    farcer::util::write_atomic(&a.out.join("loadtest.md"), md.as_bytes())?;
    plot_png(&report, &a.out.join("loadtest.png"))?;
    print!("{md}");
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// Latency of answered calls over time (median and p95 per window) beside the server's RSS.
fn plot_png(r: &LoadReport, path: &std::path::Path) -> Result<()> {
    let window = (r.seconds / 30.0).max(0.05);
    let mut buckets: Vec<Vec<f64>> = vec![Vec::new(); (r.seconds / window).ceil() as usize + 1];
    let last = buckets.len() - 1;
    for &(t, ms) in &r.timeline {
        buckets[((t / window) as usize).min(last)].push(ms);
    }
    let (mut p50, mut p95) = (Vec::new(), Vec::new());
    for (i, b) in buckets.iter_mut().enumerate() {
        if b.is_empty() {
            continue;
        }
        b.sort_by(f64::total_cmp);
        let t = (i as f64 + 0.5) * window;
        p50.push((t, b[b.len() / 2]));
        p95.push((t, b[((b.len() - 1) as f64 * 0.95).round() as usize]));
    }
    let latency: Vec<Series> = vec![
        ("p50".into(), Rgb([40, 90, 200]), p50),
        ("p95".into(), Rgb([200, 60, 40]), p95),
    ];
    let rss: Vec<Series> = vec![("resident".into(), Rgb([40, 140, 60]), r.rss_mib.clone())];
    plot::panels_png(
        path,
        &[
            ("answered calls: latency", "seconds", "ms", latency),
            ("server memory", "seconds", "MiB", rss),
        ],
    )?;
    Ok(())
}
