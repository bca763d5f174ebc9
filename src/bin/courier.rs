//! The operator CLI: migrations, broker provisioning, the topology and its
//! drift, dead letters, the outbox (status and retention), the ground-truth
//! check and the demo. The work is in the library (`courier::operate`,
//! `courier::outbox::prune`); this file parses and wires.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use courier::{
    amqp::{
        Topology,
        management::Management,
        permissions::Permissions,
        provision::{self, OPERATOR_TAGS},
    },
    check,
    config::Settings,
    demo,
    operate::{commands, dlq::Selection},
    outbox, registry, store,
};
use secrecy::SecretString;

/// courier's operator tool.
///
/// It logs in to the broker as the operator user (`amqp.operator`, tags
/// management + policymaker) and to the database as `database.user`.
/// Configuration: config/default.toml < config/$COURIER_ENV.toml <
/// COURIER__SECTION__KEY environment variables (e.g. COURIER_ENV=demo, or
/// COURIER__AMQP__VHOST=staging).
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply pending database migrations (safe to run again).
    Migrate,
    /// The broker's users and permissions (run by scripts/setup.sh).
    Broker {
        #[command(subcommand)]
        command: BrokerCommand,
    },
    /// The broker's exchanges, queues, bindings and policies.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Dead letters: list them with why they failed, show one, replay them
    /// into their work queue, purge them.
    #[command(after_help = DLQ_EXAMPLES)]
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The transactional outbox: events waiting for the broker, and its
    /// retention as an event store.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Compare ground truth now: every canceled order vs refunds in the
    /// database vs the payment gateway's ledger vs `refunds.dead` vs pending
    /// outbox rows, then where messages are now (delay tiers, dead-letter
    /// queues, pending events). Exits 1 if anything is lost, doubled or stuck
    /// (events still in flight count as lost until they settle).
    Check,
    /// Run the demo: start payment-gateway, consumer and producer, cancel a
    /// batch of orders through the API with a flaky gateway, wait until every
    /// cancellation is settled and print what happened. Exits 1 if anything
    /// was lost, doubled or left pending.
    Demo {
        /// How many orders to create and cancel.
        #[arg(long, default_value_t = 1000)]
        orders: usize,
        /// Concurrent HTTP requests.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// How long to wait for everything to settle.
        #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
        settle_timeout: Duration,
        /// Directory of the producer, consumer and payment-gateway binaries
        /// [default: the directory of this binary].
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Where the children's logs go.
        #[arg(long, default_value = "var/demo-logs")]
        log_dir: PathBuf,
        /// RabbitMQ management UI base URL, for the summary's link.
        #[arg(long, default_value = "http://127.0.0.1:15672")]
        management_url: String,
    },
}

#[derive(Subcommand, Debug)]
enum BrokerCommand {
    /// Create or update the vhost, one user per service (`amqp.producer`,
    /// `amqp.consumer`) with the narrowest permissions that work, the
    /// operator user (`amqp.operator`, tag `management`), and declare the
    /// topology as the operator. Needs an administrator's login for the
    /// management API. Safe to run again.
    Apply(AdminLogin),
    /// Print each user's grant (configure / write / read) on the vhost.
    Permissions,
}

#[derive(Subcommand, Debug)]
enum OutboxCommand {
    /// Pending events, the oldest pending event's age, how many failed at
    /// least once, and the latest errors.
    Status {
        /// How many of the latest errors to show.
        #[arg(long, default_value_t = 10)]
        errors: i64,
        /// Print JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Remove events published longer ago than `--older-than`, oldest first,
    /// in batches; events not yet published are never removed. A pull
    /// reader behind what was removed is answered 410 Gone by the event API,
    /// never silently skipped ahead: keep events at least as long as the
    /// slowest reader may be away.
    Prune {
        /// e.g. `7d`, `12h`.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Rows per transaction.
        #[arg(long, default_value_t = 1000)]
        batch_size: i64,
    },
}

#[derive(Subcommand, Debug)]
enum TopologyCommand {
    /// Declare every exchange, queue and binding and apply each queue's
    /// policy, as the operator user. Safe to run again. A queue declared with
    /// legacy arguments (settings that are policies now) is re-declared if it
    /// is empty; one holding messages is never deleted: it is reported with
    /// what to do.
    Apply {
        /// Print JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print what `apply` declares, from the configuration alone: each queue,
    /// what it is for, its policy and bindings.
    Show {
        /// Print JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
        /// The policies as the `policies` array of a RabbitMQ definitions file
        /// (to refresh config/rabbitmq-definitions.json).
        #[arg(long, conflicts_with = "json")]
        definitions: bool,
    },
    /// Compare the live broker with what courier declares and name every
    /// difference: missing or unexpected exchanges, queues and bindings,
    /// wrong or legacy arguments, policy drift. Exits 1 when they differ.
    Check {
        /// Print JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
}

const DLQ_EXAMPLES: &str = "Examples:
  courier dlq list                          every dead letter, with kind, attempts and last error
  courier dlq list refunds --json           one worker's, as JSON (refunds or refunds.dead)
  courier dlq show 0190f5c4-7f5e-...        one message: properties, headers, body
  courier dlq replay refunds --error-kind transient --dry-run
                                            what a replay would do, and which are harmless
  courier dlq replay refunds --id 0190f5c4-7f5e-...
  courier dlq purge refunds --id 0190f5c4-7f5e-...   asks first; --yes skips the question

A replay publishes the message into its work queue with the same message id and a
fresh attempt count (courier's failure headers and RabbitMQ's x-death dropped), waits
for the broker's confirm, writes an audit row to dead_letter_actions, and only then
removes the dead copy. Replaying a message whose effect already happened is harmless:
the inbox (or, for refunds, the order's recorded refund) absorbs it, and the replay
says so. A purge records each message (headers and body) in dead_letter_actions
before removing it.";

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct Which {
    /// Only the message(s) with this event id (repeat the flag for more).
    #[arg(long = "id", value_name = "EVENT_ID")]
    ids: Vec<String>,
    /// Only messages of this error kind: transient, permanent, poison or
    /// delivery-limit.
    #[arg(long, value_name = "KIND")]
    error_kind: Option<String>,
    /// Every message in the queue.
    #[arg(long)]
    all: bool,
}

impl Which {
    fn selection(self) -> Selection {
        if self.all {
            Selection::All
        } else if let Some(kind) = self.error_kind {
            Selection::ErrorKind(kind)
        } else {
            Selection::Ids(self.ids)
        }
    }
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct WhichToPurge {
    /// Only the message(s) with this event id (repeat the flag for more).
    #[arg(long = "id", value_name = "EVENT_ID")]
    ids: Vec<String>,
    /// Every message in the queue.
    #[arg(long)]
    all: bool,
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// Every dead letter of QUEUE (a worker like `refunds`, or `refunds.dead`;
    /// all workers' without it): event id, type, order, error kind, attempts,
    /// first failure, last error. The messages stay in the queue.
    List {
        /// A worker (`refunds`) or its dead-letter queue (`refunds.dead`);
        /// every worker's without it.
        queue: Option<String>,
        /// Print JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter, found by its event id in any dead-letter queue:
    /// properties, headers (x-death included) and body. Exits 1 if none.
    Show {
        /// The dead letter's event id (its AMQP message id).
        event_id: String,
        /// Print JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters of QUEUE back to its work queue with their message
    /// ids and a fresh attempt count, confirmed before each dead copy is
    /// removed, each audited in dead_letter_actions.
    Replay {
        /// A worker (`refunds`) or its dead-letter queue (`refunds.dead`).
        queue: String,
        #[command(flatten)]
        which: Which,
        /// Say what would be replayed, and which replays are harmless
        /// because the effect already happened; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Remove dead letters of QUEUE for good, after recording each (headers
    /// and body) in dead_letter_actions. Asks for confirmation.
    Purge {
        /// A worker (`refunds`) or its dead-letter queue (`refunds.dead`).
        queue: String,
        #[command(flatten)]
        which: WhichToPurge,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
        /// Print JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
}

/// An administrator of the broker, for the management API.
#[derive(Args, Debug)]
struct AdminLogin {
    #[arg(long, env = "RABBITMQ_ADMIN_USER", default_value = "guest")]
    admin_user: String,
    #[arg(
        long,
        env = "RABBITMQ_ADMIN_PASSWORD",
        default_value = "guest",
        hide_default_value = true,
        hide_env_values = true
    )]
    admin_password: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load()
        .and_then(|settings| registry::validate(&settings).map(|()| settings))
    {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("courier: {error}");
            return ExitCode::from(2);
        }
    };
    courier::telemetry::init("courier", settings.log.format);
    match run(cli.command, settings).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("courier: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate => {
            let applied = store::run_migrations(&settings.database.url()).await?;
            if applied.is_empty() {
                println!("database `{}` is up to date", settings.database.name);
            } else {
                println!(
                    "applied {} migration(s) to `{}`: {}",
                    applied.len(),
                    settings.database.name,
                    applied.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Broker {
            command: BrokerCommand::Apply(admin),
        } => {
            let management = Management::new(
                &settings.amqp.management_url,
                &admin.admin_user,
                SecretString::from(admin.admin_password),
            )?;
            let topology = Topology::from_settings(&settings.topology);
            let report = provision::provision(&management, &settings.amqp, &topology).await?;
            print!("{}", courier::operate::render::apply_report(&report));
            println!(
                "vhost `{}`: users {}, {} and {} ({OPERATOR_TAGS}) granted; topology declared",
                settings.amqp.vhost,
                settings.amqp.producer.user,
                settings.amqp.consumer.user,
                settings.amqp.operator.user
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Broker {
            command: BrokerCommand::Permissions,
        } => {
            let topology = Topology::from_settings(&settings.topology);
            let amqp = &settings.amqp;
            println!("vhost `{}`", amqp.vhost);
            for (user, grant) in [
                (&amqp.producer.user, Permissions::producer(&topology)),
                (&amqp.consumer.user, Permissions::consumer(&topology)),
                (&amqp.operator.user, Permissions::operator()),
            ] {
                println!(
                    "  {user}\n    configure {}\n    write     {}\n    read      {}",
                    grant.configure, grant.write, grant.read
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology {
            command: TopologyCommand::Apply { json },
        } => exit(commands::topology_apply(&settings, json).await?),
        Command::Topology {
            command: TopologyCommand::Check { json },
        } => exit(commands::topology_check(&settings, json).await?),
        Command::Topology {
            command: TopologyCommand::Show { json, definitions },
        } => exit(commands::topology_show(&settings, json, definitions)?),
        Command::Dlq { command } => exit(match command {
            DlqCommand::List { queue, json } => {
                commands::dlq_list(&settings, queue.as_deref(), json).await?
            }
            DlqCommand::Show { event_id, json } => {
                commands::dlq_show(&settings, &event_id, json).await?
            }
            DlqCommand::Replay {
                queue,
                which,
                dry_run,
                json,
            } => commands::dlq_replay(&settings, &queue, &which.selection(), dry_run, json).await?,
            DlqCommand::Purge {
                queue,
                which,
                yes,
                json,
            } => {
                let selection = if which.all {
                    Selection::All
                } else {
                    Selection::Ids(which.ids)
                };
                commands::dlq_purge(&settings, &queue, &selection, yes, json).await?
            }
        }),
        Command::Outbox {
            command: OutboxCommand::Status { errors, json },
        } => exit(commands::outbox_status(&settings, errors, json).await?),
        Command::Outbox {
            command:
                OutboxCommand::Prune {
                    older_than,
                    batch_size,
                },
        } => {
            let mut db = store::connect(&settings.database.url()).await?;
            let report = outbox::prune::prune(&mut db, older_than, batch_size).await?;
            for (publisher, rows, through) in &report.publishers {
                let through = through.map_or_else(|| "-".to_owned(), |t| t.to_string());
                println!(
                    "{:<8} pruned {rows:>8}  pruned through offset {through}",
                    publisher.as_str()
                );
            }
            println!("pruned {} event(s) in all", report.total());
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let mut db = store::connect(&settings.database.url()).await?;
            let (report, _) =
                check::gather(&mut db, &settings.amqp, &settings.gateway, None).await?;
            println!("canceled orders                 {:>8}", report.canceled);
            println!("refunded (our database)         {:>8}", report.refunded);
            println!(
                "refunds in the gateway's ledger {:>8}",
                report.refunds_in_gateway
            );
            println!(
                "dead-lettered                   {:>8} {:?}",
                report.dead_total(),
                report.dead_lettered
            );
            println!(
                "refunded but shelved            {:>8}",
                report.refunded_but_shelved.len()
            );
            println!("lost                            {:>8}", report.lost.len());
            println!(
                "doubled                         {:>8}",
                report.doubled.len()
            );
            println!(
                "refunds for no canceled order   {:>8}",
                report.without_cancel.len()
            );
            println!("stuck in the outbox             {:>8}", report.stuck);
            for (label, value) in report.event_model_lines() {
                println!("{label:<32}{value:>8}");
            }
            print!("{}", commands::pipeline_lines(&settings).await?);
            for order in report.lost.iter().take(20) {
                println!("  lost: order {order}");
            }
            for order in report.doubled.iter().take(20) {
                println!("  doubled: order {order}");
            }
            for key in report.without_cancel.iter().take(20) {
                println!("  refunded without a canceled order: gateway key {key}");
            }
            for (what, order) in report.event_model_findings().take(20) {
                println!("  {what}: order {order}");
            }
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Demo {
            orders,
            concurrency,
            settle_timeout,
            bin_dir,
            log_dir,
            management_url,
        } => {
            let bin_dir = match bin_dir {
                Some(dir) => dir,
                None => std::env::current_exe()?
                    .parent()
                    .map(PathBuf::from)
                    .ok_or_else(|| {
                        anyhow::anyhow!("cannot tell where the binaries are; pass --bin-dir")
                    })?,
            };
            let options = demo::DemoOptions {
                orders,
                concurrency: concurrency.max(1),
                bin_dir,
                log_dir,
                settle_timeout,
                show_progress: true,
                management_url,
            };
            println!(
                "demo: {orders} orders, gateway failing {:.0}% transiently and always for {:?}; delay tiers {:?}",
                settings.gateway_simulator.transient_error_rate * 100.0,
                settings.gateway_simulator.failing_payment_ids,
                settings.topology.retry_delays
            );
            let summary = demo::run(&settings, &options).await?;
            println!("{summary}");
            Ok(if summary.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn exit(succeeded: bool) -> anyhow::Result<ExitCode> {
    Ok(if succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
