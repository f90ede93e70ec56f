//! The `mta` command: `serve`, `check-config`, and directory and queue
//! administration. Thin glue over the library.
//!
//! Exit codes: 0 success, 1 operating error (printed once as
//! `mta: <cause chain>`), 2 usage error.

#![forbid(unsafe_code)]

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use mta::config::Config;
use mta::directory::Directory;
use mta::queue::Queue;

#[derive(Parser)]
#[command(name = "mta", version, about = "A strict, durable SMTP server for hosted domains")]
struct Cli {
    /// Configuration file.
    #[arg(short, long, default_value = "/etc/mta/mta.toml", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the SMTP server.
    Serve,
    /// Validate the configuration and print what would listen where, with what policy.
    CheckConfig,
    /// Hosted domains.
    #[command(subcommand)]
    Domain(DomainCmd),
    /// Mailboxes (logins). Passwords are read from a prompt or stdin, never from arguments.
    #[command(subcommand)]
    User(UserCmd),
    /// Aliases (`@domain` as the source is a catch-all).
    #[command(subcommand)]
    Alias(AliasCmd),
    /// Extra MAIL FROM addresses a login may use (it may always use its own).
    #[command(subcommand)]
    Sender(SenderCmd),
    /// The mail queue.
    #[command(subcommand)]
    Queue(QueueCmd),
}

#[derive(Subcommand)]
enum DomainCmd {
    Add { name: String },
    Del { name: String },
    List,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a mailbox; asks for the password (or reads one line from stdin).
    Add {
        address: String,
    },
    Del {
        address: String,
    },
    /// Change a password; asks for it (or reads one line from stdin).
    Passwd {
        address: String,
    },
    Enable {
        address: String,
    },
    Disable {
        address: String,
    },
    /// Set a quota in bytes (suffixes K, M, G: powers of 1024), or `none`.
    Quota {
        address: String,
        quota: String,
    },
    List,
}

#[derive(Subcommand)]
enum AliasCmd {
    Add { source: String, destination: String },
    Del { source: String, destination: String },
    List,
}

#[derive(Subcommand)]
enum SenderCmd {
    Allow { login: String, address: String },
    Deny { login: String, address: String },
    List,
}

#[derive(Subcommand)]
enum QueueCmd {
    List,
    /// Make every deferred message due now (the server picks them up on its next pass).
    Flush,
    Delete {
        id: String,
    },
    Hold {
        id: String,
    },
    Release {
        id: String,
    },
}

/// `println!` that returns an error instead of panicking when stdout is
/// closed or full (`mta queue list | head`, stdout on /dev/full).
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*).context("failed to write to stdout")?
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    mta::logging::init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            mta::logging::line(format_args!("mta: {e:#}"));
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let config = Config::load(&cli.config)?;
    match cli.command {
        Command::Serve => {
            // Before `prepare` drops privileges and chroots: the socket
            // stays connected, /dev/log would be out of reach afterwards.
            if config.log_to == mta::config::LogTo::Syslog {
                let path = &config.syslog_socket;
                mta::logging::to_syslog(path)
                    .with_context(|| format!("failed to connect to the syslog socket {}", path.display()))?;
                mta::logging::line(format_args!("mta: logging to syslog {}", path.display()));
            }
            let prepared = mta::server::prepare(config)?;
            let rt =
                tokio::runtime::Builder::new_multi_thread().enable_all().build().context("failed to start tokio")?;
            rt.block_on(mta::server::run(prepared))
        }
        Command::CheckConfig => check_config(&config),
        Command::Queue(cmd) => queue_cmd(&config, cmd),
        Command::Domain(cmd) => with_directory(&config, |d| async move { domain_cmd(&d, cmd).await }),
        Command::User(cmd) => {
            let length_min = config.password_length_min;
            with_directory(&config, |d| async move { user_cmd(&d, cmd, length_min).await })
        }
        Command::Alias(cmd) => with_directory(&config, |d| async move { alias_cmd(&d, cmd).await }),
        Command::Sender(cmd) => with_directory(&config, |d| async move { sender_cmd(&d, cmd).await }),
    }
}

fn with_directory<F, Fut>(config: &Config, f: F) -> Result<()>
where
    F: FnOnce(Directory) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("failed to start tokio")?;
    rt.block_on(async {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("failed to create data_dir {}", config.data_dir.display()))?;
        let d = Directory::open(&config.directory_url).await?;
        let r = f(d.clone()).await;
        d.close().await;
        r
    })
}

fn check_config(config: &Config) -> Result<()> {
    mta::privileges::check(&config.privileges, nix::unistd::Uid::effective().is_root())?;
    if let Some(t) = &config.tls {
        mta::tls::server_config(&t.cert, &t.key).context("failed to load TLS material")?;
    }
    mta::server::outbound_secrets(config)?;
    out!("{}{}config ok: {}", config.describe(), mta::server::describe_paths(config), config.path.display());
    Ok(())
}

/// Reads a new password (twice from a terminal prompt, else one line from
/// stdin) and refuses one shorter than `length_min` characters.
fn read_password(length_min: u32) -> Result<String> {
    let password = read_password_text()?;
    let n = password.chars().count();
    if n < length_min as usize {
        bail!(
            "the password has {n} {}; at least {length_min} are required (`password_length_min` in the config)",
            if n == 1 { "character" } else { "characters" }
        );
    }
    Ok(password)
}

fn read_password_text() -> Result<String> {
    if std::io::stdin().is_terminal() {
        let a = rpassword::prompt_password("Password: ").context("failed to read the password")?;
        let b = rpassword::prompt_password("Again: ").context("failed to read the password")?;
        if a != b {
            bail!("the passwords do not match");
        }
        Ok(a)
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).context("failed to read the password from stdin")?;
        Ok(line.trim_end_matches(['\n', '\r']).to_string())
    }
}

async fn domain_cmd(d: &Directory, cmd: DomainCmd) -> Result<()> {
    match cmd {
        DomainCmd::Add { name } => out!("added domain {}", d.add_domain(&name).await?),
        DomainCmd::Del { name } => {
            d.del_domain(&name).await?;
            out!("deleted domain {name}");
        }
        DomainCmd::List => {
            for n in d.list_domains().await? {
                out!("{n}");
            }
        }
    }
    Ok(())
}

async fn user_cmd(d: &Directory, cmd: UserCmd, password_length_min: u32) -> Result<()> {
    match cmd {
        UserCmd::Add { address } => {
            let password = read_password(password_length_min)?;
            out!("added mailbox {}", d.add_user(&address, &password).await?);
        }
        UserCmd::Passwd { address } => {
            let password = read_password(password_length_min)?;
            d.set_password(&address, &password).await?;
            out!("password changed for {address}");
        }
        UserCmd::Del { address } => {
            d.del_user(&address).await?;
            out!("deleted mailbox {address} (its Maildir is kept on disk)");
        }
        UserCmd::Enable { address } => d.set_enabled(&address, true).await?,
        UserCmd::Disable { address } => d.set_enabled(&address, false).await?,
        UserCmd::Quota { address, quota } => d.set_quota(&address, parse_quota(&quota)?).await?,
        UserCmd::List => {
            for u in d.list_users().await? {
                let quota = u.quota_bytes.map_or(String::new(), |q| format!("\tquota {q} bytes"));
                out!("{}\t{}{quota}", u.address, if u.enabled { "enabled" } else { "disabled" });
            }
        }
    }
    Ok(())
}

async fn alias_cmd(d: &Directory, cmd: AliasCmd) -> Result<()> {
    match cmd {
        AliasCmd::Add { source, destination } => {
            let (s, t) = d.add_alias(&source, &destination).await?;
            out!("added alias {s} -> {t}");
        }
        AliasCmd::Del { source, destination } => d.del_alias(&source, &destination).await?,
        AliasCmd::List => {
            for (s, t) in d.list_aliases().await? {
                out!("{s}\t{t}");
            }
        }
    }
    Ok(())
}

/// `none`, or bytes with an optional K/M/G suffix (powers of 1024).
fn parse_quota(text: &str) -> Result<Option<u64>> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let upper = text.to_ascii_uppercase();
    let (digits, unit) = match upper.strip_suffix(['K', 'M', 'G']) {
        Some(d) => (d, &upper[d.len()..]),
        None => (upper.as_str(), ""),
    };
    let shift = match unit {
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => 0,
    };
    let n: u64 = digits.parse().map_err(|_| {
        anyhow::anyhow!("quota {text:?} is not a number of bytes; write e.g. 500000, 200M, 2G, or none")
    })?;
    let bytes = n.checked_mul(1 << shift).filter(|b| *b > 0 && *b <= i64::MAX as u64);
    match bytes {
        Some(b) => Ok(Some(b)),
        None => bail!("quota {text:?} must be between 1 byte and 8 EiB; `none` removes the quota"),
    }
}

async fn sender_cmd(d: &Directory, cmd: SenderCmd) -> Result<()> {
    match cmd {
        SenderCmd::Allow { login, address } => d.allow_sender(&login, &address).await?,
        SenderCmd::Deny { login, address } => d.deny_sender(&login, &address).await?,
        SenderCmd::List => {
            for (l, a) in d.list_senders().await? {
                out!("{l}\t{a}");
            }
        }
    }
    Ok(())
}

fn queue_cmd(config: &Config, cmd: QueueCmd) -> Result<()> {
    // Changes take the server's lock, so they never race its delivery task;
    // while a server holds it they go through its admin socket instead.
    // `list` only reads and works beside a running server.
    let request = match &cmd {
        QueueCmd::List => None,
        QueueCmd::Flush => Some("flush".to_string()),
        QueueCmd::Delete { id } => Some(format!("delete {id}")),
        QueueCmd::Hold { id } => Some(format!("hold {id}")),
        QueueCmd::Release { id } => Some(format!("release {id}")),
    };
    let _lock = match request {
        None => None,
        Some(request) => match mta::lock::acquire(&config.data_dir) {
            Ok(lock) => Some(lock),
            Err(mta::lock::LockError::Held { holder, .. }) => {
                let answer = ask_server(&config.data_dir, &request)
                    .with_context(|| format!("failed to ask the running server (PID {holder}) to {request}"))?;
                out!("{answer}");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        },
    };
    let queue = Queue::attach(&config.queue_dir())?;
    match cmd {
        QueueCmd::List => {
            let entries = queue.list()?;
            if entries.is_empty() {
                out!("queue empty");
            }
            let now = mta::delivery::now_unix();
            for e in entries {
                let env = &e.envelope;
                let from = if env.from.is_empty() { "<>" } else { &env.from };
                let next = if e.held {
                    "next attempt: when released".to_string()
                } else if env.next_attempt_unix <= now {
                    "next attempt: now".to_string()
                } else {
                    format!("next attempt in {} s", env.next_attempt_unix - now)
                };
                out!(
                    "{}\t{}\t{} bytes\tfrom {}\tto {}\tattempts {}\t{next}{}",
                    env.id,
                    if e.held { "held" } else { "active" },
                    e.size_bytes,
                    from,
                    env.local.iter().chain(env.remote.iter()).cloned().collect::<Vec<_>>().join(","),
                    env.attempts,
                    env.last_error.as_deref().map(|s| format!("\t{s}")).unwrap_or_default()
                );
            }
        }
        QueueCmd::Flush => {
            let n = queue.flush()?;
            out!("{n} {} due now", if n == 1 { "message" } else { "messages" });
        }
        QueueCmd::Delete { id } => {
            queue.remove(&id)?;
            out!("deleted {id}");
        }
        QueueCmd::Hold { id } => {
            queue.set_held(&id, true)?;
            out!("held {id}");
        }
        QueueCmd::Release { id } => {
            queue.set_held(&id, false)?;
            out!("released {id}");
        }
    }
    Ok(())
}

/// Sends one request to the running server's admin socket and returns
/// its answer (`ok …`), or its refusal as an error.
fn ask_server(data_dir: &std::path::Path, request: &str) -> Result<String> {
    use std::io::Read;
    let path = data_dir.join(mta::server::control::SOCKET_FILE);
    let mut s = std::os::unix::net::UnixStream::connect(&path)
        .with_context(|| format!("failed to connect to {}", path.display()))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(90))).context("failed to set a timeout")?;
    s.write_all(format!("{request}\n").as_bytes()).with_context(|| format!("failed to write to {}", path.display()))?;
    let mut answer = String::new();
    s.take(4096).read_to_string(&mut answer).with_context(|| format!("failed to read from {}", path.display()))?;
    let answer = answer.trim();
    match answer.strip_prefix("ok ") {
        Some(text) => Ok(text.to_string()),
        None => {
            bail!("{}", answer.strip_prefix("error ").unwrap_or(if answer.is_empty() { "no answer" } else { answer }))
        }
    }
}
