//! The results of a run and their presentations: text table, Markdown, JSON.

use crate::fio::Measurement;
use crate::jobs::{Job, Metric};
use crate::sysinfo::RunInfo;
use crate::targets::Target;
use serde::Serialize;

/// One (target, job) cell.
#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    pub target: Target,
    pub job: Job,
    /// None when the job failed (see `error`).
    pub measurement: Option<Measurement>,
    pub error: Option<String>,
    /// CPU used by the server process during the job (ramp included), in cores
    /// (1.0 = one core busy the whole time). None for the raw target.
    pub server_cpu_cores: Option<f64>,
    /// CPU the server used during the second before the job, with no client connected
    /// (background work left over from earlier jobs), in cores.
    pub server_idle_cpu_cores: Option<f64>,
}

/// Sequential fill of a target before its jobs.
#[derive(Debug, Clone, Serialize)]
pub struct Precondition {
    pub target: Target,
    pub seconds: f64,
    pub mib_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub info: RunInfo,
    pub targets: Vec<Target>,
    pub jobs: Vec<Job>,
    pub results: Vec<JobResult>,
    pub preconditions: Vec<Precondition>,
    /// Things worth knowing about the run (fallbacks, warnings, blockd accounting...).
    pub notes: Vec<String>,
    /// Errors that made a target's results incomplete.
    pub errors: Vec<String>,
}

/// The value a table cell compares: IOPS or MiB/s.
pub fn primary(job: Job, m: &Measurement) -> f64 {
    match job.metric() {
        Metric::Iops => m.iops,
        Metric::Bandwidth => m.mib_s(),
    }
}

/// `value / baseline`, None when either is missing or the baseline is zero.
pub fn ratio(value: Option<f64>, baseline: Option<f64>) -> Option<f64> {
    match (value, baseline) {
        (Some(v), Some(b)) if b > 0.0 => Some(v / b),
        _ => None,
    }
}

pub fn format_ratio(r: f64) -> String {
    format!("{r:.2}x")
}

/// Integer with thousands separators; one decimal below 100 (small MiB/s, µs).
pub fn format_value(v: f64) -> String {
    if v < 100.0 {
        return format!("{v:.1}");
    }
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rendered table: header and rows of cells (first column left-aligned, others right).
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Report {
    fn get(&self, target: Target, job: Job) -> Option<&JobResult> {
        self.results
            .iter()
            .find(|r| r.target == target && r.job == job)
    }

    fn value(&self, target: Target, job: Job) -> Option<f64> {
        self.get(target, job)
            .and_then(|r| r.measurement.as_ref())
            .map(|m| primary(job, m))
    }

    fn baseline(&self) -> Option<Target> {
        self.targets
            .iter()
            .copied()
            .find(|t| t.name() == self.info.baseline)
    }

    /// Ratio of `target` to the baseline for `job`.
    pub fn ratio_of(&self, target: Target, job: Job) -> Option<f64> {
        let b = self.baseline()?;
        ratio(self.value(target, job), self.value(b, job))
    }

    /// Jobs where blockd is below the baseline (blockd < 1.0x).
    pub fn blockd_below_baseline(&self, job: Job) -> bool {
        self.baseline() != Some(Target::Blockd)
            && self.ratio_of(Target::Blockd, job).is_some_and(|r| r < 1.0)
    }

    /// The main table: a row per job (value and ratio per target), plus a completion
    /// latency row (p50/p99 µs) under each 4K job.
    pub fn table(&self) -> Table {
        let mut header = vec!["job".to_string(), "metric".to_string()];
        header.extend(self.targets.iter().map(|t| t.name().to_string()));
        header.push("note".into());
        let mut rows = Vec::new();
        for &job in &self.jobs {
            let mut row = vec![job.name().to_string(), job.metric().unit().to_string()];
            for &t in &self.targets {
                let cell = match self.get(t, job) {
                    None => "-".to_string(),
                    Some(r) => match &r.measurement {
                        None => "FAILED".to_string(),
                        Some(m) => {
                            let v = format_value(primary(job, m));
                            match self.ratio_of(t, job) {
                                Some(r) => format!("{v} ({})", format_ratio(r)),
                                None => v,
                            }
                        }
                    },
                };
                row.push(cell);
            }
            row.push(if self.blockd_below_baseline(job) {
                format!("blockd < {}", self.info.baseline)
            } else {
                String::new()
            });
            rows.push(row);
            if job.metric() == Metric::Iops {
                let mut lat = vec!["  clat p50/p99".to_string(), "µs".to_string()];
                for &t in &self.targets {
                    let m = self.get(t, job).and_then(|r| r.measurement.as_ref());
                    lat.push(match m.map(|m| (m.clat_p50_us, m.clat_p99_us)) {
                        Some((Some(p50), Some(p99))) => {
                            format!("{}/{}", format_value(p50), format_value(p99))
                        }
                        _ => "-".into(),
                    });
                }
                lat.push(String::new());
                rows.push(lat);
            }
        }
        Table { header, rows }
    }

    /// CPU the server processes used, per job, in cores.
    pub fn cpu_table(&self) -> Table {
        let servers: Vec<Target> = self
            .targets
            .iter()
            .copied()
            .filter(|t| *t != Target::Raw)
            .collect();
        let mut header = vec!["job".to_string()];
        header.extend(servers.iter().map(|t| t.name().to_string()));
        let rows = self
            .jobs
            .iter()
            .map(|&job| {
                let mut row = vec![job.name().to_string()];
                for &t in &servers {
                    let r = self.get(t, job);
                    let fmt = |c: Option<f64>| c.map(|c| format!("{c:.2}"));
                    row.push(
                        match (
                            fmt(r.and_then(|r| r.server_cpu_cores)),
                            fmt(r.and_then(|r| r.server_idle_cpu_cores)),
                        ) {
                            (Some(busy), Some(idle)) => format!("{busy} / {idle}"),
                            (Some(busy), None) => busy,
                            _ => "-".into(),
                        },
                    );
                }
                row
            })
            .collect();
        Table { header, rows }
    }

    pub fn to_text(&self) -> String {
        let i = &self.info;
        let mut s = format!(
            "fio-benches nbd: {} export, {} s per job (+{} s ramp), numjobs=1; ratios vs {}\n\n",
            format_bytes(i.size_bytes),
            i.runtime_s,
            i.ramp_time_s,
            i.baseline
        );
        s += &render_text(&self.table());
        if self.jobs.iter().any(|&j| self.blockd_below_baseline(j)) {
            s += &format!(
                "\nnote: marks rows where blockd is below 1.0x {}\n",
                i.baseline
            );
        }
        if self.targets.iter().any(|t| *t != Target::Raw) {
            s += "\nserver CPU in cores (1.00 = one core busy; the machine has ";
            s += &format!(
                "{}): during the job / idle in the second before it (background work):\n",
                i.cpus
            );
            s += &render_text(&self.cpu_table());
        }
        for e in &self.errors {
            s += &format!("\nERROR: {e}\n");
        }
        s
    }

    pub fn to_markdown(&self) -> String {
        let i = &self.info;
        let mut s = format!("### fio-benches nbd, {}\n\n", i.date);
        s += &format!("- Command: `{}`\n", i.command);
        s += &format!("- Date: {}\n", i.date);
        s += &format!("- fio: {}\n", i.fio_version);
        if let Some(q) = &i.qemu_version {
            s += &format!(
                "- qemu: {q} (aio={})\n",
                i.qsd_aio.as_deref().unwrap_or("not run")
            );
        }
        if let Some(n) = &i.nbdkit_version {
            s += &format!(
                "- nbdkit: {n} (file plugin, threads={}, cache={})\n",
                i.nbdkit_threads, i.nbdkit_cache
            );
        }
        if let Some(b) = &i.blockd_version {
            s += &format!(
                "- blockd: {b} ({}{})\n",
                i.blockd_binary.as_deref().unwrap_or("?"),
                i.workspace_git
                    .as_deref()
                    .map(|g| format!(", workspace {g}"))
                    .unwrap_or_default()
            );
        }
        s += &format!(
            "- Kernel: {}; CPUs: {}{}\n",
            i.kernel,
            i.cpus,
            i.cpu_model
                .as_deref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        );
        s += &format!(
            "- Load average (1/5/15 min) before the run: {}\n",
            i.loadavg_start.as_deref().unwrap_or("?")
        );
        s += &format!(
            "- Disk: {} ({}); export size {}; {} s per job after {} s ramp; numjobs=1; ratios vs {}\n\n",
            i.work_dir,
            i.filesystem.as_deref().unwrap_or("?"),
            format_bytes(i.size_bytes),
            i.runtime_s,
            i.ramp_time_s,
            i.baseline
        );
        s += &render_markdown(&self.table());
        if self.jobs.iter().any(|&j| self.blockd_below_baseline(j)) {
            s += &format!(
                "\nThe note column marks rows where blockd is below 1.0x {}.\n",
                i.baseline
            );
        }
        if self.targets.iter().any(|t| *t != Target::Raw) {
            s += "\nServer CPU in cores, during the job / idle in the second before it (background work):\n\n";
            s += &render_markdown(&self.cpu_table());
        }
        if !self.notes.is_empty() {
            s += "\nNotes:\n\n";
            for n in &self.notes {
                s += &format!("- {n}\n");
            }
        }
        for e in &self.errors {
            s += &format!("\n**Error:** {e}\n");
        }
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        // Ratios are derived, but handy for whoever reads the JSON.
        let ratios: Vec<serde_json::Value> = self
            .jobs
            .iter()
            .flat_map(|&job| {
                self.targets.iter().map(move |&t| {
                    serde_json::json!({
                        "target": t,
                        "job": job,
                        "metric": job.metric(),
                        "ratio": self.ratio_of(t, job),
                    })
                })
            })
            .collect();
        if let Some(o) = v.as_object_mut() {
            o.insert("ratios".into(), ratios.into());
        }
        v
    }
}

pub fn format_bytes(b: u64) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{} GiB", b >> 30)
    } else {
        format!("{} MiB", b >> 20)
    }
}

pub fn render_text(t: &Table) -> String {
    let ncol = t.header.len();
    let mut w = vec![0usize; ncol];
    for row in std::iter::once(&t.header).chain(&t.rows) {
        for (i, c) in row.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |row: &Vec<String>| {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = " ".repeat(w[i] - c.chars().count());
                if i == 0 || i + 1 == ncol && t.header[i] == "note" {
                    format!("{c}{pad}")
                } else {
                    format!("{pad}{c}")
                }
            })
            .collect();
        cells.join("  ").trim_end().to_string() + "\n"
    };
    let mut s = line(&t.header);
    s += &(w
        .iter()
        .map(|n| "-".repeat(*n))
        .collect::<Vec<_>>()
        .join("  ")
        + "\n");
    for r in &t.rows {
        s += &line(r);
    }
    s
}

pub fn render_markdown(t: &Table) -> String {
    let esc = |c: &str| c.replace('|', "\\|");
    let mut s = format!(
        "| {} |\n",
        t.header
            .iter()
            .map(|c| esc(c))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    s += &format!(
        "|{}\n",
        t.header
            .iter()
            .enumerate()
            .map(|(i, h)| if i == 0 || h == "note" {
                "---|"
            } else {
                "---:|"
            })
            .collect::<String>()
    );
    for r in &t.rows {
        let cells: Vec<String> = r
            .iter()
            .map(|c| {
                // Keep indentation visible in Markdown.
                let c = esc(c);
                match c.strip_prefix("  ") {
                    Some(rest) => format!("&nbsp;&nbsp;{rest}"),
                    None => c,
                }
            })
            .collect();
        s += &format!("| {} |\n", cells.join(" | "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fio;

    const RANDREAD: &str = include_str!("../testdata/fio-randread-4k-qd1.json");
    const SEQWRITE: &str = include_str!("../testdata/fio-seqwrite-1m-qd8.json");

    fn scaled(m: &Measurement, f: f64) -> Measurement {
        let mut m = m.clone();
        m.iops *= f;
        m.bw_kib *= f;
        m
    }

    fn sample_report() -> Report {
        let rr = fio::parse(RANDREAD, false).unwrap();
        let sw = fio::parse(SEQWRITE, true).unwrap();
        let targets = vec![Target::Raw, Target::QemuStorageDaemon, Target::Blockd];
        let mut results = Vec::new();
        // raw 2x, qsd 1x, blockd 0.5x on QD1; blockd 1.25x on seqwrite.
        for (t, f_rr, f_sw, cpu, idle) in [
            (Target::Raw, 2.0, 2.0, None, None),
            (Target::QemuStorageDaemon, 1.0, 1.0, Some(0.5), Some(0.0)),
            (Target::Blockd, 0.5, 1.25, Some(1.25), Some(0.5)),
        ] {
            results.push(JobResult {
                target: t,
                job: Job::RandRead4kQd1,
                measurement: Some(scaled(&rr, f_rr)),
                error: None,
                server_cpu_cores: cpu,
                server_idle_cpu_cores: idle,
            });
            results.push(JobResult {
                target: t,
                job: Job::SeqWrite1mQd8,
                measurement: Some(scaled(&sw, f_sw)),
                error: None,
                server_cpu_cores: cpu,
                server_idle_cpu_cores: idle,
            });
        }
        Report {
            info: RunInfo {
                command: "fio-benches nbd --quick".into(),
                date: "2026-11-23T12:14:03Z".into(),
                fio_version: "fio-3.33".into(),
                qemu_version: Some("qemu-storage-daemon version 10.0.2".into()),
                qsd_aio: Some("io_uring".into()),
                kernel: "6.18.44".into(),
                cpus: 2,
                size_bytes: 256 << 20,
                runtime_s: 3,
                ramp_time_s: 2,
                baseline: "qemu-storage-daemon".into(),
                ..RunInfo::default()
            },
            targets,
            jobs: vec![Job::RandRead4kQd1, Job::SeqWrite1mQd8],
            results,
            preconditions: vec![],
            notes: vec!["a note".into()],
            errors: vec![],
        }
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(format_ratio(1.123), "1.12x");
        assert_eq!(format_ratio(0.5), "0.50x");
        let r = sample_report();
        let q = r.ratio_of(Target::Blockd, Job::RandRead4kQd1).unwrap();
        assert!((q - 0.5).abs() < 1e-9);
        assert!(r.blockd_below_baseline(Job::RandRead4kQd1));
        assert!(!r.blockd_below_baseline(Job::SeqWrite1mQd8));
    }

    #[test]
    fn values() {
        assert_eq!(format_value(13908.09), "13,908");
        assert_eq!(format_value(1234567.0), "1,234,567");
        assert_eq!(format_value(999.6), "1,000");
        assert_eq!(format_value(44.8), "44.8");
        assert_eq!(format_value(128.512), "129");
    }

    #[test]
    fn text_table() {
        let r = sample_report();
        let t = r.table();
        assert_eq!(
            t.header,
            [
                "job",
                "metric",
                "raw",
                "qemu-storage-daemon",
                "blockd",
                "note"
            ]
        );
        assert_eq!(
            t.rows[0],
            [
                "randread-4k-qd1",
                "IOPS",
                "27,816 (2.00x)",
                "13,908 (1.00x)",
                "6,954 (0.50x)",
                "blockd < qemu-storage-daemon"
            ]
        );
        assert_eq!(
            t.rows[1],
            [
                "  clat p50/p99",
                "µs",
                "44.8/129",
                "44.8/129",
                "44.8/129",
                ""
            ]
        );
        assert_eq!(
            t.rows[2],
            [
                "seqwrite-1m-qd8",
                "MiB/s",
                "4,937 (2.00x)",
                "2,469 (1.00x)",
                "3,086 (1.25x)",
                ""
            ]
        );
        let text = r.to_text();
        let expected = "\
job              metric             raw  qemu-storage-daemon         blockd  note
---------------  ------  --------------  -------------------  -------------  ----------------------------
randread-4k-qd1    IOPS  27,816 (2.00x)       13,908 (1.00x)  6,954 (0.50x)  blockd < qemu-storage-daemon
  clat p50/p99       µs        44.8/129             44.8/129       44.8/129
seqwrite-1m-qd8   MiB/s   4,937 (2.00x)        2,469 (1.00x)  3,086 (1.25x)
";
        assert!(text.contains(expected), "got:\n{text}");
        assert!(text.contains("ratios vs qemu-storage-daemon"));
        assert!(text.contains("note: marks rows where blockd is below 1.0x"));
        assert!(
            text.contains("randread-4k-qd1          0.50 / 0.00  1.25 / 0.50"),
            "{text}"
        );
    }

    #[test]
    fn failed_cells_and_missing_baseline() {
        let mut r = sample_report();
        r.results[4].measurement = None; // blockd randread
        r.results[4].error = Some("boom".into());
        let t = r.table();
        assert_eq!(t.rows[0][4], "FAILED");
        assert_eq!(t.rows[1][4], "-");
        assert!(!r.blockd_below_baseline(Job::RandRead4kQd1));

        r.targets.retain(|t| *t != Target::QemuStorageDaemon);
        let t = r.table();
        assert_eq!(t.rows[2][2], "4,937", "no ratio without a baseline");
    }

    #[test]
    fn markdown() {
        let md = sample_report().to_markdown();
        assert!(md.contains("- Command: `fio-benches nbd --quick`"), "{md}");
        assert!(md.contains("- fio: fio-3.33"));
        assert!(md.contains("- qemu: qemu-storage-daemon version 10.0.2 (aio=io_uring)"));
        assert!(md.contains("- Kernel: 6.18.44; CPUs: 2"));
        assert!(md.contains("| job | metric | raw | qemu-storage-daemon | blockd | note |\n|---|---:|---:|---:|---:|---|\n"));
        assert!(md.contains(
            "| randread-4k-qd1 | IOPS | 27,816 (2.00x) | 13,908 (1.00x) | 6,954 (0.50x) | blockd < qemu-storage-daemon |"
        ));
        assert!(md.contains("| &nbsp;&nbsp;clat p50/p99 | µs |"));
        assert!(md.contains("- a note"));
    }

    #[test]
    fn json() {
        let v = sample_report().to_json();
        assert_eq!(v["info"]["fio_version"], "fio-3.33");
        assert_eq!(v["results"][0]["target"], "raw");
        assert_eq!(v["results"][0]["job"], "randread-4k-qd1");
        assert_eq!(v["results"][0]["measurement"]["clat_p50_us"], 44.8);
        let ratios = v["ratios"].as_array().unwrap();
        let b = ratios
            .iter()
            .find(|r| r["target"] == "blockd" && r["job"] == "randread-4k-qd1")
            .unwrap();
        assert!((b["ratio"].as_f64().unwrap() - 0.5).abs() < 1e-9);
    }
}
