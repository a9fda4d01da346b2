//! A small state machine for tests: every command is appended, length-prefixed, to
//! one file; a checkpoint syncs the file and its summary is the file's length.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use keel_raft::{Checkpoint, CheckpointFile, Command, LogId, Reply, StateMachine};

pub struct FileMachine {
    path: PathBuf,
    file: File,
    len: u64,
}

const NAME: &str = "commands";

impl FileMachine {
    /// Opens the machine in `dir` at the state of `summary` (the file cut to the
    /// length it gives), or empty.
    pub fn open(dir: &Path, summary: Option<&[u8]>) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join(NAME);
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)?;
        let len = match summary {
            Some(bytes) => u64::from_le_bytes(
                bytes
                    .try_into()
                    .map_err(|_| io::Error::other("bad summary"))?,
            ),
            None => 0,
        };
        file.set_len(len)?;
        Ok(Self { path, file, len })
    }

    /// Every command applied, in order.
    pub fn commands(&self) -> io::Result<Vec<Bytes>> {
        commands_in(&self.path, Some(self.len))
    }
}

/// The commands in the machine's file in `dir`, as far as they are complete.
pub fn commands_of(dir: &Path) -> io::Result<Vec<Bytes>> {
    commands_in(&dir.join(NAME), None)
}

fn commands_in(path: &Path, len: Option<u64>) -> io::Result<Vec<Bytes>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let mut commands = Vec::new();
    let end = len.map_or(bytes.len(), |len| len as usize);
    let mut rest = &bytes[..end];
    while rest.len() >= 4 {
        let (len, tail) = rest.split_at(4);
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        if tail.len() < len {
            break;
        }
        commands.push(Bytes::copy_from_slice(&tail[..len]));
        rest = &tail[len..];
    }
    Ok(commands)
}

impl StateMachine for FileMachine {
    fn apply(&mut self, log_id: &LogId, command: &Command) -> io::Result<Reply> {
        self.file.seek(SeekFrom::Start(self.len))?;
        self.file
            .write_all(&(command.0.len() as u32).to_le_bytes())?;
        self.file.write_all(&command.0)?;
        self.len += 4 + command.0.len() as u64;
        Ok(Reply(Bytes::from(log_id.index.to_le_bytes().to_vec())))
    }

    fn checkpoint(&mut self) -> io::Result<Checkpoint> {
        self.file.sync_data()?;
        Ok(Checkpoint {
            files: vec![CheckpointFile {
                name: NAME.to_owned(),
                path: self.path.clone(),
                len: self.len,
            }],
            state: self.len.to_le_bytes().to_vec(),
        })
    }

    fn install(&mut self, data: &Path, state: &[u8]) -> io::Result<()> {
        let len = u64::from_le_bytes(
            state
                .try_into()
                .map_err(|_| io::Error::other("bad summary"))?,
        );
        let tmp = self.path.with_extension("installing");
        fs::copy(data.join(NAME), &tmp)?;
        fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        self.file.set_len(len)?;
        self.len = len;
        Ok(())
    }
}
