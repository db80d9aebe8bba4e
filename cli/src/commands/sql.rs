//! `ablate sql QUERY`: read-only queries over the public views.

use ablate_schema::proto;
use tokio_stream::StreamExt;

use crate::client::{connect, status_error};
use crate::render::{cell, table};
use crate::Format;

pub async fn run(addr: &str, query: &str, format: Format, timeout_s: u64) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let mut stream = client
        .query(proto::QueryRequest {
            sql: query.to_string(),
            timeout_ms: (timeout_s * 1000).min(u32::MAX as u64) as u32,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut columns = Vec::new();
    let mut rows: Vec<Vec<serde_json::Value>> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(status_error)?;
        if !chunk.columns.is_empty() {
            columns = chunk.columns;
        }
        for r in chunk.rows_json {
            rows.push(serde_json::from_str(&r)?);
        }
    }
    match format {
        Format::Table => {
            let cells: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(cell).collect()).collect();
            print!("{}", table(&columns, &cells));
            eprintln!("({} row{})", rows.len(), if rows.len() == 1 { "" } else { "s" });
        }
        Format::Csv => {
            println!("{}", columns.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(","));
            for r in &rows {
                println!(
                    "{}",
                    r.iter().map(|v| csv_field(&cell(v))).collect::<Vec<_>>().join(",")
                );
            }
        }
        Format::Json => {
            let objects: Vec<serde_json::Value> = rows
                .into_iter()
                .map(|r| {
                    let map: serde_json::Map<String, serde_json::Value> = columns.iter().cloned().zip(r).collect();
                    serde_json::Value::Object(map)
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&objects)?);
        }
    }
    Ok(())
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}
