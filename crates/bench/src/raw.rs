//! The physical limit as a [`System`] of the load engine: records appended to a
//! plain file with `pwrite` and `fdatasync`, in this process.

use std::io::Read;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;

use crate::engine::{Producer, System, micros};

/// A plain file: `pwrite` + `fdatasync` per acknowledgement, one writer at a time.
pub(crate) struct Raw {
    file: Arc<Mutex<RawFile>>,
    path: std::path::PathBuf,
    record_bytes: usize,
}

/// The file, the end of its data, and how far it is preallocated.
pub(crate) struct RawFile {
    file: std::fs::File,
    len: u64,
    allocated: u64,
}

/// Space preallocated at a time: a sync after a write inside the file's length needs no
/// change of size, the cheapest a durable append can be on this filesystem.
const RAW_PREALLOCATE: u64 = 64 << 20;

impl RawFile {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = self.len + bytes.len() as u64;
        if end > self.allocated {
            let grow = (end - self.allocated).max(RAW_PREALLOCATE);
            rustix::fs::fallocate(
                &self.file,
                rustix::fs::FallocateFlags::empty(),
                self.allocated,
                grow,
            )?;
            self.allocated += grow;
        }
        self.file.write_all_at(bytes, self.len)?;
        self.file.sync_data()?;
        self.len = end;
        Ok(())
    }
}

impl Raw {
    pub(crate) fn start(dir: &std::path::Path, record_bytes: usize) -> anyhow::Result<Self> {
        let path = dir.join("raw.data");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let file = RawFile {
            file,
            len: 0,
            allocated: 0,
        };
        Ok(Self {
            file: Arc::new(Mutex::new(file)),
            path,
            record_bytes,
        })
    }
}

/// A writer of the shared file.
#[derive(Clone)]
pub(crate) struct RawProducer {
    file: Arc<Mutex<RawFile>>,
}

impl RawProducer {
    async fn write(&self, values: Vec<Bytes>) -> anyhow::Result<()> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || {
            let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
            let mut buffer = Vec::with_capacity(values.iter().map(Bytes::len).sum());
            for value in &values {
                buffer.extend_from_slice(value);
            }
            file.append(&buffer)?;
            anyhow::Ok(())
        })
        .await?
    }
}

impl Producer for RawProducer {
    async fn produce(&mut self, value: Bytes) -> anyhow::Result<()> {
        self.write(vec![value]).await
    }

    async fn produce_batch(&mut self, values: &[Bytes]) -> anyhow::Result<()> {
        self.write(values.to_vec()).await
    }

    /// The disk's limit for a window of single records: each sync covers every record
    /// that arrived while the previous one ran, which here is the whole window.
    async fn produce_pipelined(
        &mut self,
        value: Bytes,
        window: usize,
        deadline: Instant,
        latencies: &mut Histogram<u64>,
    ) -> anyhow::Result<u64> {
        let values: Vec<Bytes> = (0..window).map(|_| value.clone()).collect();
        let mut acked = 0;
        while Instant::now() < deadline {
            let sent = Instant::now();
            self.write(values.clone()).await?;
            let latency = micros(sent.elapsed());
            latencies.record_n(latency, window as u64)?;
            acked += window as u64;
        }
        Ok(acked)
    }
}

impl System for Raw {
    type Producer = RawProducer;

    async fn connect(&self) -> anyhow::Result<RawProducer> {
        Ok(RawProducer {
            file: Arc::clone(&self.file),
        })
    }

    async fn read(&self, count: u64) -> anyhow::Result<u64> {
        let (path, record_bytes) = (self.path.clone(), self.record_bytes.max(1));
        // Only written bytes count, not the preallocated zeros after them.
        let written = self.file.lock().unwrap_or_else(PoisonError::into_inner).len;
        tokio::task::spawn_blocking(move || {
            let mut file = std::fs::File::open(&path)?.take(written);
            let mut buffer = vec![0u8; 1 << 20];
            let mut bytes = 0u64;
            while bytes < count * record_bytes as u64 {
                let n = file.read(&mut buffer)?;
                if n == 0 {
                    break;
                }
                bytes += n as u64;
            }
            anyhow::Ok(bytes / record_bytes as u64)
        })
        .await?
    }
}
