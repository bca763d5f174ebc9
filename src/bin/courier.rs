//! The operator CLI: migrations, broker provisioning, the outbox's retention,
//! the ground-truth check and the demo.

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
    demo, outbox, registry, store,
};
use secrecy::SecretString;

/// courier's operator tool.
///
/// Configuration: config/default.toml < config/$COURIER_ENV.toml <
/// COURIER__SECTION__KEY environment variables.
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
    /// The broker's exchanges, queues and bindings.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// The outbox as an event store.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Compare ground truth now: every canceled order vs refunds in the
    /// database vs the payment gateway's ledger vs `refunds.dead` vs pending
    /// outbox rows. Exits 1 if anything is lost, doubled or stuck (events
    /// still in flight count as lost until they settle).
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
    /// Declare every exchange, queue and binding as the operator user (safe
    /// to run again; fails naming the object whose arguments differ).
    Apply,
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
    courier::telemetry::init("courier");
    let settings = match Settings::load()
        .and_then(|settings| registry::validate(&settings).map(|()| settings))
    {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("courier: {error}");
            return ExitCode::from(2);
        }
    };
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
            provision::provision(&management, &settings.amqp, &topology).await?;
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
            command: TopologyCommand::Apply,
        } => {
            let topology = Topology::from_settings(&settings.topology);
            provision::declare_topology(&settings.amqp, &topology).await?;
            println!(
                "topology declared on {}",
                settings.amqp.display_addr_as(&settings.amqp.operator)
            );
            Ok(ExitCode::SUCCESS)
        }
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
