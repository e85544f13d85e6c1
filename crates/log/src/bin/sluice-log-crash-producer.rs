//! Test helper for the kill -9 durability test: produces 100-record batches to topic `t` of the
//! embedded log in the folder given as the only argument, forever, printing `ACK <offset>`
//! once each batch is acknowledged. The test kills it with SIGKILL mid-stream.

use std::io::Write;

use sluice_log::{EmbeddedLog, EmbeddedOptions, Log, Producer, Record, TopicSpec};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: sluice-log-crash-producer DIR")?;
    let log = EmbeddedLog::open(std::path::Path::new(&dir), EmbeddedOptions::default())?;
    log.create_topic(&TopicSpec::new("t", 1)).await?;
    let producer = log.producer()?;
    let mut out = std::io::stdout().lock();
    for batch in 0u64.. {
        let records: Vec<Record> = (0..100)
            .map(|i| Record {
                key: Some(b"k".to_vec()),
                value: format!("b{batch}-{i}").into_bytes(),
                ..Record::default()
            })
            .collect();
        let delivered = producer.send("t", records).await?;
        if let Some(last) = delivered.last() {
            writeln!(out, "ACK {}", last.offset)?;
            out.flush()?;
        }
    }
    Ok(())
}
