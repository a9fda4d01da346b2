//! The log service's client commands: `keel produce` and `keel consume`.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use keel_log::Client;

use super::{ClientAuthArgs, ConsumeArgs, Format, ProduceArgs};

/// What a client command presents: its token, and its TLS settings.
pub(super) fn credentials(auth: &ClientAuthArgs) -> anyhow::Result<keel_log::Credentials> {
    let mut credentials = match &auth.token {
        None => keel_log::Credentials::default(),
        Some(token) => {
            keel_log::Credentials::bearer(token).map_err(|why| anyhow::anyhow!("--token: {why}"))?
        }
    };
    if let Some(files) = auth.tls_files() {
        credentials = credentials.with_tls(keel_serve::tls::client_config(&files, &[b"h2"])?);
    }
    Ok(credentials)
}

pub(super) async fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    let mut client = Client::connect_with(&args.addr, credentials(&args.auth)?).await?;
    if !args.values.is_empty() {
        let values: Vec<Bytes> = args.values.into_iter().map(Bytes::from).collect();
        let offsets = client.produce_batch(&args.topic, values).await?;
        for offset in offsets {
            println!("{offset}");
        }
        return Ok(());
    }

    let stdin = std::io::stdin();
    // A progress bar when stdin is a file and a person is watching.
    let progress = match std::fs::metadata("/dev/stdin") {
        Ok(meta) if meta.is_file() && std::io::stderr().is_terminal() => {
            let bar = indicatif::ProgressBar::new(meta.len());
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            Some(bar)
        }
        _ => None,
    };
    let mut lines = stdin.lock();
    let mut batch = Vec::with_capacity(args.batch);
    let mut first = None;
    let mut last = None;
    let mut count: u64 = 0;
    let mut line = String::new();
    loop {
        line.clear();
        let read = lines.read_line(&mut line).context("reading stdin")?;
        if read > 0 {
            if let Some(bar) = &progress {
                bar.inc(read as u64);
            }
            let value = line.trim_end_matches(['\n', '\r']);
            batch.push(Bytes::copy_from_slice(value.as_bytes()));
        }
        if batch.len() >= args.batch.max(1) || (read == 0 && !batch.is_empty()) {
            let sent = std::mem::take(&mut batch);
            count += sent.len() as u64;
            let offsets = client.produce_batch(&args.topic, sent).await?;
            first.get_or_insert(offsets.start);
            last = Some(offsets.end);
        }
        if read == 0 {
            break;
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    match (first, last) {
        (Some(first), Some(last)) => eprintln!("produced {count} records, offsets {first}..{last}"),
        _ => eprintln!("stdin was empty: nothing produced"),
    }
    Ok(())
}

pub(super) async fn consume(args: ConsumeArgs) -> anyhow::Result<()> {
    let mut client = Client::connect_with(&args.addr, credentials(&args.auth)?).await?;
    let mut stream = client
        .subscribe(&args.topic, args.from, args.follow, 0)
        .await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut printed: u64 = 0;
    let limit = args.max.unwrap_or(u64::MAX);
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    while printed < limit {
        let chunk = tokio::select! {
            chunk = stream.next() => chunk,
            _ = &mut interrupted => None,
        };
        let Some(chunk) = chunk else { break };
        for record in chunk? {
            if printed >= limit {
                break;
            }
            match args.format {
                Format::Text => {
                    out.write_all(&record.value)?;
                    out.write_all(b"\n")?;
                }
                Format::Json => {
                    let line = serde_json::json!({
                        "offset": record.offset,
                        "timestamp_ms": record.timestamp_ms,
                        "value": base64::engine::general_purpose::STANDARD.encode(&record.value),
                    });
                    writeln!(out, "{line}")?;
                }
            }
            printed += 1;
        }
        out.flush()?;
    }
    Ok(())
}
