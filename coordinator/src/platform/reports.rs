//! A family's report of an experiment, built from its trials' outcomes (the gRPC
//! `Report` and the dashboard's `/api/v1/experiments/{id}/report` alike).

use ablate_experiments::report::Report;
use ablate_schema::ExperimentId;
use sqlx::PgPool;

use crate::db;
use crate::error::Error;

/// The report of experiment `id`, read through `pool`.
pub async fn build(pool: &PgPool, id: ExperimentId) -> Result<Report, Error> {
    let (family, mut outcomes) = db::report_outcomes(pool, id).await?;
    let family = ablate_experiments::Family::parse(&family).map_err(Error::InvalidArgument)?;
    let mut conn = pool.acquire().await?;
    let (spec, _) = db::spec_and_goal(&mut conn, id).await?;
    ablate_experiments::sweep::report(family, &spec, &mut outcomes).map_err(|e| Error::InvalidArgument(e.to_string()))
}
