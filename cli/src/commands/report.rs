//! `ablate report EXP`: the family's report as text (with figures written as
//! SVG and PNG) or as JSON.

use std::path::PathBuf;

use ablate_experiments::report::Report;
use ablate_schema::proto;

use crate::client::{connect, status_error};
use crate::{plot, ReportFormat};

pub async fn run(addr: &str, experiment: &str, format: ReportFormat, out: Option<PathBuf>) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let response = client
        .report(proto::GetExperimentRequest {
            experiment_id: experiment.to_string(),
            best: 0,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let report: Report = serde_json::from_str(&response.report_json)?;
    if let ReportFormat::Json = format {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print!("{}", report.to_text());
    if !report.figures.is_empty() {
        let dir = out.unwrap_or_else(|| PathBuf::from("reports").join(experiment));
        println!();
        for figure in &report.figures {
            for path in plot::write(figure, &dir)? {
                println!("figure: {}", path.display());
            }
        }
    }
    Ok(())
}
