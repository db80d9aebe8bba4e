//! `ablate`: the researcher's command line.
//!
//! Three layers: clap types here, the resolved coordinator address, then one
//! file per command under `commands/`.

mod client;
mod commands;
mod embedded;
mod plot;
mod render;

use std::net::SocketAddr;
use std::path::PathBuf;

use ablate_schema::Limits;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "ablate",
    version,
    about = "scaling-science sweeps: submit, watch, query in SQL"
)]
struct Cli {
    /// The coordinator's address, or several replicas' (serving one database) separated by
    /// commas: the first that answers is used.
    #[arg(
        long,
        global = true,
        env = "ABLATE_COORDINATOR",
        default_value = "http://127.0.0.1:7077"
    )]
    coordinator: String,
    /// The CA certificate (PEM) an `https://` coordinator's certificate is checked against;
    /// by default the system's roots.
    #[arg(long, global = true, env = "ABLATE_CA")]
    ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Starts the embedded stack: PostgreSQL (unless DATABASE_URL is set), a coordinator, one local worker.
    Up(UpArgs),
    /// Stops a stack started with `ablate up --detach`.
    Down(StateArgs),
    /// Runs a coordinator against DATABASE_URL.
    Serve(ServeArgs),
    /// Starts or stops only the embedded PostgreSQL; `start` prints its URL.
    Db {
        #[command(subcommand)]
        action: DbAction,
    },
    /// Submits a sweep spec (TOML or YAML); prints the experiment id on stdout.
    Submit {
        spec: PathBuf,
        /// Shows progress on stderr until the sweep ends; exits non-zero if it fails.
        #[arg(long)]
        wait: bool,
        /// Adds the spec's points that the finished experiment EXP does not hold yet to
        /// it, instead of making a new experiment; the spec's base must agree with EXP's.
        #[arg(long, value_name = "EXP")]
        into: Option<String>,
        /// Changes the spec before it goes: PATH=VALUE, such as base.steps=100 or
        /// sweep.params.width=[32,64] (repeatable).
        #[arg(long = "set", value_name = "PATH=VALUE")]
        sets: Vec<String>,
    },
    /// Lists experiments (those with a tag, with --tag), or shows one with its best trials.
    Status {
        experiment: Option<String>,
        /// Only experiments with this tag.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Puts a finished experiment's failed, crashed or cancelled trials back to pending;
    /// their attempts are kept and they resume from their newest checkpoints.
    Retry {
        experiment: String,
        /// Which trials, comma-separated: failed (the program said so), crashed (its
        /// process died or its lease expired), cancelled.
        #[arg(long, value_delimiter = ',', default_value = "failed,crashed,cancelled")]
        outcome: Vec<String>,
    },
    /// Adds tags to an experiment (or removes them, with --remove).
    Tag {
        experiment: String,
        #[arg(required = true)]
        tags: Vec<String>,
        #[arg(long)]
        remove: bool,
    },
    /// Sets an experiment's note ("" clears it).
    Note { experiment: String, text: String },
    /// Deletes a finished experiment: its rows and its objects (checkpoints, logs). What
    /// other experiments reused of it stays theirs.
    Delete { experiment: String },
    /// Removes the objects in the object store that no row references (admin).
    Gc {
        /// Lists what would go and removes nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keeps objects younger than this (a checkpoint being written has no row
        /// yet): seconds, or with a unit: 90s, 15m, 1h.
        #[arg(long, default_value = "1h", value_parser = parse_age)]
        min_age: u64,
    },
    /// Shows progress bars until the experiment ends.
    Watch { experiment: String },
    /// Cancels an experiment's pending and running trials.
    Cancel { experiment: String },
    /// Prints a trial's log: its process's stdout and stderr (bounded), any trial.
    Logs {
        trial: String,
        /// Keeps printing what the running attempt writes until it ends.
        #[arg(short, long)]
        follow: bool,
        /// Which attempt (1 is the first); the newest when left out.
        #[arg(long)]
        attempt: Option<u32>,
    },
    /// The family's report: tables, the verdict on its criteria, figures (SVG and PNG).
    Report {
        experiment: String,
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
        /// Where figures go; defaults to reports/<EXP>.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Prints the web dashboard's address with a login token in it: open it in a browser.
    Dashboard {
        /// The dashboard's base address, when the coordinator's HTTP listener is reached
        /// at another host or port than its gRPC address (behind a proxy or port-forward).
        #[arg(long)]
        url: Option<String>,
    },
    /// Lists registered workers; `ablate workers drain ID` drains one.
    Workers {
        #[command(subcommand)]
        action: Option<WorkersAction>,
    },
    /// Runs a read-only SQL query against the views in schema `ablate`.
    Sql {
        query: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Statement timeout in seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Keeps a token for a coordinator in the credentials file (~/.config/ablate/credentials.toml, mode 0600).
    Login {
        /// The coordinator's address, such as http://host:7077.
        url: String,
        /// The token; read from stdin when not given.
        #[arg(long)]
        token: Option<String>,
    },
    /// Creates, lists and revokes access tokens (admin tokens only).
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
}

#[derive(Subcommand)]
enum WorkersAction {
    /// The worker takes no new trials and exits once its running ones have ended (admin).
    Drain {
        /// The worker's id, or a prefix that names one worker.
        worker: String,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Creates a token and prints it, once, on stdout.
    Create {
        /// researcher, worker or admin.
        #[arg(long)]
        role: String,
        #[arg(long)]
        name: Option<String>,
        /// When it expires: 30d, 12h, 45m, 90s.
        #[arg(long)]
        expires: Option<String>,
    },
    /// Lists tokens (never their secrets).
    List,
    /// Revokes a token at once.
    Revoke { name: String },
    /// Sets the fair-share weight of the user a token names (default 1): with weight 2
    /// their sweeps get twice the slots of a weight-1 user's while both wait for slots.
    Weight { name: String, weight: f64 },
}

#[derive(Subcommand)]
enum DbAction {
    Start {
        #[command(flatten)]
        state: StateArgs,
        #[arg(long, default_value_t = 54329)]
        pg_port: u16,
    },
    Stop {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Prints a PostgreSQL URL (a new password each time) for a login that may read only the
    /// views in schema `ablate`: for psql, pandas or Grafana. Asks the coordinator (admin with --auth).
    ReaderUrl,
    /// Applies the schema migrations to a database (a deployment's migration job), and
    /// registers tokens whose secrets you made (such as a Kubernetes Secret's).
    Migrate {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// ROLE:NAME:FILE: the token in FILE (32 or more characters) is NAME's, with ROLE
        /// (researcher, worker or admin); it replaces what NAME held. Repeat it for more.
        #[arg(long = "register-token", value_name = "ROLE:NAME:FILE")]
        register_tokens: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

#[derive(clap::Args, Clone)]
pub struct StateArgs {
    /// Where the embedded stack keeps its state (PostgreSQL data, objects, logs).
    #[arg(long, default_value = ".ablate")]
    pub state_dir: PathBuf,
}

#[derive(clap::Args, Clone)]
pub struct UpArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Runs in the background; `ablate down` stops it.
    #[arg(long)]
    pub detach: bool,
    /// The coordinator's listen address.
    #[arg(long, default_value = "127.0.0.1:7077")]
    pub listen: SocketAddr,
    /// The coordinator's HTTP listener (the web dashboard at /, Prometheus metrics at
    /// /metrics, /healthz, /readyz), or `off`; by default the port after --listen's
    /// on the same host (127.0.0.1:7078).
    #[arg(long)]
    pub http_listen: Option<String>,
    /// The local worker's device slots: auto, cpu:K or cuda:0,cuda:1.
    #[arg(long, default_value = "auto")]
    pub devices: String,
    /// Port of the embedded PostgreSQL.
    #[arg(long, default_value_t = 54329)]
    pub pg_port: u16,
    /// Use this PostgreSQL instead of the embedded one.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// What one user may send a shared coordinator (defaults in `ablate_schema::Limits`).
#[derive(clap::Args, Clone, Debug)]
pub struct LimitArgs {
    /// Trials one experiment may expand into.
    #[arg(long, default_value_t = Limits::default().max_trials)]
    pub max_trials: u64,
    /// Bytes of a spec's text.
    #[arg(long, default_value_t = Limits::default().max_spec_bytes)]
    pub max_spec_bytes: usize,
    /// Characters of an experiment's name.
    #[arg(long, default_value_t = Limits::default().max_name_chars)]
    pub max_name_chars: usize,
    /// Characters of other strings: descriptions, parameter names and values, metric names.
    #[arg(long, default_value_t = Limits::default().max_string_chars)]
    pub max_string_chars: usize,
    /// Parameters of one trial.
    #[arg(long, default_value_t = Limits::default().max_params)]
    pub max_params: usize,
    /// Metric names in one batch of a trial.
    #[arg(long, default_value_t = Limits::default().max_metric_names)]
    pub max_metric_names: usize,
    /// Points in one metric batch.
    #[arg(long, default_value_t = Limits::default().max_batch_points)]
    pub max_batch_points: usize,
    /// Bytes of a trial's outputs (JSON).
    #[arg(long, default_value_t = Limits::default().max_output_bytes)]
    pub max_output_bytes: usize,
    /// Training steps of one trial (its steps, or examples over its batch size).
    #[arg(long, default_value_t = Limits::default().max_steps)]
    pub max_steps: u64,
    /// Connections of the pool that serves `ablate sql` and reports, apart from the workers'.
    #[arg(long, default_value_t = 4)]
    pub reader_connections: u32,
    /// `ablate sql` and report queries one address may run at once.
    #[arg(long, default_value_t = 2)]
    pub queries_per_caller: u32,
    /// A folder trials may read local data under (repeat it for more); by default the
    /// provisioned data folder and /usr/share/datasets. Other paths in specs are refused.
    #[arg(long)]
    pub data_root: Vec<PathBuf>,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            max_trials: self.max_trials,
            max_spec_bytes: self.max_spec_bytes,
            max_name_chars: self.max_name_chars,
            max_string_chars: self.max_string_chars,
            max_params: self.max_params,
            max_metric_names: self.max_metric_names,
            max_batch_points: self.max_batch_points,
            max_output_bytes: self.max_output_bytes,
            max_steps: self.max_steps,
        }
    }

    /// Puts the limits into a coordinator's options.
    pub fn apply(&self, options: &mut ablate_coordinator::Options) {
        options.limits = self.limits();
        options.reader_connections = self.reader_connections;
        options.queries_per_caller = self.queries_per_caller;
        if !self.data_root.is_empty() {
            options.data_roots = self.data_root.clone();
        }
    }

    /// The same flags, for a child `ablate up`.
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--max-trials", self.max_trials.to_string()),
            ("--max-spec-bytes", self.max_spec_bytes.to_string()),
            ("--max-name-chars", self.max_name_chars.to_string()),
            ("--max-string-chars", self.max_string_chars.to_string()),
            ("--max-params", self.max_params.to_string()),
            ("--max-metric-names", self.max_metric_names.to_string()),
            ("--max-batch-points", self.max_batch_points.to_string()),
            ("--max-output-bytes", self.max_output_bytes.to_string()),
            ("--max-steps", self.max_steps.to_string()),
            ("--reader-connections", self.reader_connections.to_string()),
            ("--queries-per-caller", self.queries_per_caller.to_string()),
        ]
        .into_iter()
        .chain(self.data_root.iter().map(|r| ("--data-root", r.display().to_string())))
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect()
    }
}

#[derive(clap::Args, Clone)]
pub struct ServeArgs {
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// A streaming replica of the database: `ablate sql`, reports, the dashboard's reads
    /// and the reader login go there, so analytic queries never touch the primary that
    /// leases and ingests (README, "Readers on a replica").
    #[arg(long, env = "ABLATE_READER_DATABASE_URL")]
    pub reader_database_url: Option<String>,
    #[arg(long, default_value = "127.0.0.1:7077")]
    pub listen: SocketAddr,
    /// A running trial's points before its newest checkpoint move into compact chunks
    /// once there are this many (a finished trial's move at once).
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(i64).range(1..))]
    pub chunk_running_after: i64,
    /// Seconds a lease lasts without a heartbeat.
    #[arg(long, default_value_t = 15.0)]
    pub lease_ttl: f64,
    /// Require a token with the right role on every call (see `ablate token`).
    #[arg(long)]
    pub auth: bool,
    /// With --auth: the first admin's token is kept in this file (created, mode 0600, when missing).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// The server's TLS certificate chain (PEM); with --tls-key, the listener speaks only TLS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The server's TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Listen beyond this host without TLS and tokens anyway.
    #[arg(long)]
    pub insecure: bool,
    /// Seconds after start-up before expired leases are reaped, so workers re-attach
    /// the leases they held across a restart; default twice the lease TTL.
    #[arg(long)]
    pub reap_grace: Option<f64>,
    /// An HTTP listener for Prometheus metrics (/metrics) and probes (/healthz, /readyz).
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// The workers' object store (a directory or s3://bucket/prefix): where command
    /// trials' packed code is kept and trials' logs are read.
    #[arg(long, env = "ABLATE_OBJECT_STORE")]
    pub object_store: Option<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let service = match cli.command {
        Command::Up(_) | Command::Serve(_) => "ablate-coordinator",
        _ => "ablate",
    };
    let _traces = match ablate_schema::trace::init(service) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("error: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(ca) = &cli.ca {
        // Read by every connection the CLI makes; set before any thread starts.
        std::env::set_var("ABLATE_CA", ca);
    }
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = runtime.block_on(async {
        let addr = cli.coordinator.clone();
        match cli.command {
            Command::Up(args) => commands::up::run(args).await,
            Command::Down(args) => commands::up::down(args).await,
            Command::Serve(args) => commands::serve::run(args).await,
            Command::Db {
                action: DbAction::Start { state, pg_port },
            } => {
                let (_, url) = embedded::EmbeddedPg::start(&state.state_dir, pg_port)?;
                println!("{url}");
                Ok(())
            }
            Command::Db {
                action: DbAction::Stop { state },
            } => embedded::EmbeddedPg::stop_dir(&state.state_dir),
            Command::Db {
                action:
                    DbAction::Migrate {
                        database_url,
                        register_tokens,
                    },
            } => commands::serve::migrate(&database_url, &register_tokens).await,
            Command::Db {
                action: DbAction::ReaderUrl,
            } => commands::token::reader_url(&addr).await,
            Command::Submit { spec, wait, into, sets } => {
                commands::submit::run(&addr, &spec, wait, into.as_deref(), &sets).await
            }
            Command::Status { experiment, tag } => {
                commands::status::run(&addr, experiment.as_deref(), tag.as_deref()).await
            }
            Command::Retry { experiment, outcome } => commands::lifecycle::retry(&addr, &experiment, outcome).await,
            Command::Tag {
                experiment,
                tags,
                remove,
            } => commands::lifecycle::tag(&addr, &experiment, tags, remove).await,
            Command::Note { experiment, text } => commands::lifecycle::note(&addr, &experiment, text).await,
            Command::Delete { experiment } => commands::lifecycle::delete(&addr, &experiment).await,
            Command::Gc { dry_run, min_age } => commands::lifecycle::gc(&addr, dry_run, min_age).await,
            Command::Watch { experiment } => commands::watch::run(&addr, &experiment).await.map(|_| ()),
            Command::Cancel { experiment } => commands::cancel::run(&addr, &experiment).await,
            Command::Logs { trial, follow, attempt } => commands::logs::run(&addr, &trial, follow, attempt).await,
            Command::Workers { action: None } => commands::workers::run(&addr).await,
            Command::Workers {
                action: Some(WorkersAction::Drain { worker }),
            } => commands::workers::drain(&addr, &worker).await,
            Command::Report {
                experiment,
                format,
                out,
            } => commands::report::run(&addr, &experiment, format, out).await,
            Command::Sql { query, format, timeout } => commands::sql::run(&addr, &query, format, timeout).await,
            Command::Login { url, token } => commands::token::login(&url, token).await,
            Command::Dashboard { url } => commands::dashboard::run(&addr, url.as_deref()).await,
            Command::Token { action } => match action {
                TokenAction::Create { role, name, expires } => {
                    commands::token::create(&addr, &role, name, expires).await
                }
                TokenAction::List => commands::token::list(&addr).await,
                TokenAction::Revoke { name } => commands::token::revoke(&addr, &name).await,
                TokenAction::Weight { name, weight } => commands::token::weight(&addr, &name, weight).await,
            },
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--min-age`: seconds, or a number with s, m, h or d.
fn parse_age(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}`: expected seconds or a number with s, m, h or d, such as 15m"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: the unit is one of s, m, h, d")),
    };
    Ok(n.saturating_mul(scale))
}
