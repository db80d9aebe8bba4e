//! The reader: researchers' read-only SQL, as the read-only role under a statement timeout.

use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Postgres, SqlSafeStr};

use crate::error::{Error, Result};

/// The first keyword of a query, after comments and parentheses.
fn leading_keyword(sql: &str) -> String {
    let mut rest = sql.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map(|x| x.1).unwrap_or("").trim_start();
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map(|x| x.1).unwrap_or("").trim_start();
        } else if let Some(after) = rest.strip_prefix('(') {
            rest = after.trim_start();
        } else {
            break;
        }
    }
    rest.chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Result of a read-only query: column names and rows as JSON arrays.
pub struct QueryRows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

/// Runs a researcher's query in a read-only transaction, as the read-only
/// role, under a statement timeout. Writes of any kind are refused.
pub async fn read_only_query(pool: &PgPool, sql: &str, timeout: Duration) -> Result<QueryRows> {
    let keyword = leading_keyword(sql);
    if !matches!(keyword.as_str(), "select" | "with" | "values" | "table") {
        return Err(Error::Query(format!(
            "ablate sql runs read-only queries: `{keyword}` is not allowed; start with select, with, values or table"
        )));
    }
    let body = sql.trim().trim_end_matches(';');
    let mut conn = pool.acquire().await?;
    let result = run_read_only(&mut conn, body, timeout).await;
    // Nothing a query did may outlive it on a pooled connection: session
    // advisory locks, settings, temporary tables, prepared statements.
    // sqlx's own prepared statements go first (closed properly), then the rest,
    // over the simple protocol so that no statement of ours is left cached.
    let reset = async {
        sqlx::Connection::clear_cached_statements(&mut *conn).await?;
        sqlx::raw_sql("discard all").execute(&mut *conn).await
    };
    if let Err(error) = reset.await {
        tracing::warn!(%error, "could not reset a reader connection; closing it");
        conn.close_on_drop();
    }
    result
}

async fn run_read_only(conn: &mut sqlx::PgConnection, body: &str, timeout: Duration) -> Result<QueryRows> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query("set transaction read only").execute(&mut *tx).await?;
    sqlx::query("select set_config('statement_timeout', $1, true)")
        .bind(timeout.as_millis().max(1).to_string())
        .execute(&mut *tx)
        .await?;
    sqlx::query("set local role ablate_reader").execute(&mut *tx).await?;
    // The researcher's query is dynamic by design: it runs in a read-only
    // transaction as the read-only role, which may read only the public views.
    let described = sqlx::Executor::describe(&mut *tx, AssertSqlSafe(body).into_sql_str())
        .await
        .map_err(query_error)?;
    let columns: Vec<String> = described
        .columns()
        .iter()
        .map(|c| sqlx::Column::name(c).to_string())
        .collect();
    // json (not jsonb) keeps duplicate column names and their order.
    let wrapped = format!(
        "select coalesce((select json_agg(e.value order by e.n)
                          from json_each(row_to_json(q)) with ordinality as e(key, value, n)), '[]')::text
         from ({body}\n) as q"
    );
    let texts: Vec<(String,)> = sqlx::query_as::<Postgres, (String,)>(AssertSqlSafe(wrapped))
        .fetch_all(&mut *tx)
        .await
        .map_err(query_error)?;
    tx.rollback().await?;
    let mut rows = Vec::with_capacity(texts.len());
    for (text,) in texts {
        let row: Vec<Value> = serde_json::from_str(&text).map_err(|e| Error::Query(format!("unreadable row: {e}")))?;
        rows.push(row);
    }
    Ok(QueryRows { columns, rows })
}

/// The login role people use for psql, pandas or Grafana: a member of
/// `ablate_reader`, so it reads the views in schema `ablate` and nothing else.
pub const READER_LOGIN: &str = "ablate_reader_login";

/// Creates (or re-keys) the reader login with `password`.
pub async fn set_reader_login(pool: &PgPool, password: &str) -> Result<()> {
    let mut tx = pool.begin().await?;
    let exists: bool = sqlx::query_scalar("select exists (select 1 from pg_roles where rolname = $1)")
        .bind(READER_LOGIN)
        .fetch_one(&mut *tx)
        .await?;
    // Role names and passwords can't be bound as parameters; both are ours
    // (a constant, and hex from the coordinator's generator), quoted anyway.
    let quoted = password.replace('\'', "''");
    let statement = if exists {
        format!("alter role {READER_LOGIN} with login password '{quoted}'")
    } else {
        format!("create role {READER_LOGIN} with login password '{quoted}' in role ablate_reader")
    };
    sqlx::query(AssertSqlSafe(statement)).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

fn query_error(error: sqlx::Error) -> Error {
    match error {
        sqlx::Error::Database(db) => Error::Query(db.message().to_string()),
        other => Error::Db(other),
    }
}

#[cfg(test)]
mod tests {
    use super::leading_keyword;

    #[test]
    fn leading_keyword_skips_comments_and_parentheses() {
        assert_eq!(leading_keyword("  -- hi\n /* x */ (SELECT 1)"), "select");
        assert_eq!(leading_keyword("delete from x"), "delete");
        assert_eq!(leading_keyword("With a as (select 1) select * from a"), "with");
    }
}
