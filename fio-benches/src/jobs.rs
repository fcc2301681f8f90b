//! The job set every target runs.

use clap::ValueEnum;
use serde::Serialize;

/// What a job's table cell shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// I/O operations per second (with completion latency percentiles).
    Iops,
    /// MiB/s.
    Bandwidth,
}

impl Metric {
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Iops => "IOPS",
            Metric::Bandwidth => "MiB/s",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, Serialize)]
pub enum Job {
    #[value(name = "randread-4k-qd32")]
    #[serde(rename = "randread-4k-qd32")]
    RandRead4kQd32,
    #[value(name = "randwrite-4k-qd32")]
    #[serde(rename = "randwrite-4k-qd32")]
    RandWrite4kQd32,
    #[value(name = "randread-4k-qd1")]
    #[serde(rename = "randread-4k-qd1")]
    RandRead4kQd1,
    #[value(name = "seqread-1m-qd8")]
    #[serde(rename = "seqread-1m-qd8")]
    SeqRead1mQd8,
    #[value(name = "seqwrite-1m-qd8")]
    #[serde(rename = "seqwrite-1m-qd8")]
    SeqWrite1mQd8,
    /// Sequential read again, after the random writes: the same job on an "aged" export.
    /// In-place stores are unaffected; a log-structured one (blockd) now reads blocks the
    /// random writes scattered.
    #[value(name = "seqread-1m-qd8-aged")]
    #[serde(rename = "seqread-1m-qd8-aged")]
    SeqRead1mQd8Aged,
}

impl Job {
    /// Run order: reads first, on the sequentially preconditioned export (the state every
    /// target starts from), then the writes, then the sequential read again on the aged
    /// export.
    pub const ALL: [Job; 6] = [
        Job::RandRead4kQd32,
        Job::RandRead4kQd1,
        Job::SeqRead1mQd8,
        Job::RandWrite4kQd32,
        Job::SeqRead1mQd8Aged,
        Job::SeqWrite1mQd8,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Job::RandRead4kQd32 => "randread-4k-qd32",
            Job::RandWrite4kQd32 => "randwrite-4k-qd32",
            Job::RandRead4kQd1 => "randread-4k-qd1",
            Job::SeqRead1mQd8 => "seqread-1m-qd8",
            Job::SeqWrite1mQd8 => "seqwrite-1m-qd8",
            Job::SeqRead1mQd8Aged => "seqread-1m-qd8-aged",
        }
    }

    /// fio `--rw=`.
    pub fn rw(self) -> &'static str {
        match self {
            Job::RandRead4kQd32 | Job::RandRead4kQd1 => "randread",
            Job::RandWrite4kQd32 => "randwrite",
            Job::SeqRead1mQd8 | Job::SeqRead1mQd8Aged => "read",
            Job::SeqWrite1mQd8 => "write",
        }
    }

    /// fio `--bs=`.
    pub fn bs(self) -> &'static str {
        match self {
            Job::RandRead4kQd32 | Job::RandWrite4kQd32 | Job::RandRead4kQd1 => "4k",
            Job::SeqRead1mQd8 | Job::SeqWrite1mQd8 | Job::SeqRead1mQd8Aged => "1M",
        }
    }

    pub fn iodepth(self) -> u32 {
        match self {
            Job::RandRead4kQd32 | Job::RandWrite4kQd32 => 32,
            Job::RandRead4kQd1 => 1,
            Job::SeqRead1mQd8 | Job::SeqWrite1mQd8 | Job::SeqRead1mQd8Aged => 8,
        }
    }

    pub fn is_write(self) -> bool {
        matches!(self, Job::RandWrite4kQd32 | Job::SeqWrite1mQd8)
    }

    pub fn is_random(self) -> bool {
        matches!(
            self,
            Job::RandRead4kQd32 | Job::RandWrite4kQd32 | Job::RandRead4kQd1
        )
    }

    pub fn metric(self) -> Metric {
        if self.is_random() {
            Metric::Iops
        } else {
            Metric::Bandwidth
        }
    }
}
