//! The directory: hosted domains, mailboxes (Argon2id hashes, enabled
//! flag, optional quota), aliases (including `@domain` catch-alls) and the
//! sender login map, in SQL through sqlx's `Any` driver: SQLite by default,
//! MySQL/MariaDB by URL. Queries are runtime strings using only the SQL
//! both dialects share.
//!
//! Main type: [`Directory`]. It answers the session's sender and recipient
//! questions with [`SenderFacts`] and [`RecipientFacts`]; the decisions
//! themselves are in `smtp::policy`.

pub mod password;

use std::collections::BTreeSet;

use std::sync::Arc;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use tokio::sync::Semaphore;

use crate::limits::PASSWORD_VERIFICATIONS_CONCURRENT_MAX;

use crate::smtp::address::{self, Address, AddressError};
use crate::smtp::policy::{RecipientFacts, SenderFacts};

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("failed to open the directory {url}: {cause}")]
    Open { url: String, cause: sqlx::Error },
    #[error("failed to migrate the directory schema: {0}")]
    Migrate(sqlx::Error),
    #[error("directory query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("invalid address {address:?}: {cause}")]
    Address { address: String, cause: AddressError },
    #[error("domain {0} is not hosted here (add it with `mta domain add {0}`)")]
    UnknownDomain(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("domain {0} still has mailboxes or aliases; delete them first")]
    DomainInUse(String),
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("passwords must not be empty")]
    EmptyPassword,
    #[error("failed to protect the directory file {path}: {cause}")]
    Protect { path: std::path::PathBuf, cause: std::io::Error },
}

/// The SQLite file behind a `sqlite://` URL, if it is one.
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite://")?;
    Some(std::path::PathBuf::from(rest.split('?').next().unwrap_or(rest)))
}

/// Keeps the password hashes private: creates the SQLite file behind `url`
/// mode 0600 before SQLite does (SQLite gives its -wal and -shm files the
/// database's mode), and takes group and world access away from an
/// existing file and its -wal, -shm and -journal, saying so. Other URLs
/// (MySQL) are left alone.
pub fn protect_sqlite_files(url: &str) -> Result<(), DirectoryError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let Some(db) = sqlite_path(url) else { return Ok(()) };
    let err = |path: &std::path::Path| {
        let path = path.to_owned();
        move |cause| DirectoryError::Protect { path, cause }
    };
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&db) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        // A missing parent directory: SQLite reports it better.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(&db)(e)),
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let path = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err(&path)(e)),
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o700)).map_err(err(&path))?;
            tracing::warn!(
                path = %path.display(),
                "the user directory had mode {mode:04o} (other local users could read the password hashes); now {:04o}",
                mode & 0o700
            );
        }
    }
    Ok(())
}

/// Aliases may point at aliases; expansion stops at this depth.
const ALIAS_DEPTH_MAX: usize = 8;
/// Mailboxes one recipient may expand to.
const ALIAS_FANOUT_MAX: usize = 1000;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS domains (name VARCHAR(255) NOT NULL PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS mailboxes (address VARCHAR(320) NOT NULL PRIMARY KEY, \
     domain VARCHAR(255) NOT NULL, password_hash VARCHAR(255) NOT NULL, \
     enabled INTEGER NOT NULL DEFAULT 1, quota_bytes BIGINT NULL)",
    "CREATE TABLE IF NOT EXISTS aliases (source VARCHAR(320) NOT NULL, destination VARCHAR(320) NOT NULL, \
     PRIMARY KEY (source, destination))",
    "CREATE TABLE IF NOT EXISTS sender_logins (login VARCHAR(320) NOT NULL, address VARCHAR(320) NOT NULL, \
     PRIMARY KEY (login, address))",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxInfo {
    pub address: String,
    pub enabled: bool,
    pub quota_bytes: Option<i64>,
}

#[derive(Clone)]
pub struct Directory {
    pool: AnyPool,
    /// Bounds the memory and CPU that concurrent AUTH attempts can take.
    hashing: Arc<Semaphore>,
}

impl Directory {
    /// Connects and creates missing tables. SQLite files are created if absent.
    pub async fn open(url: &str) -> Result<Directory, DirectoryError> {
        sqlx::any::install_default_drivers();
        protect_sqlite_files(url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .connect(url)
            .await
            .map_err(|cause| DirectoryError::Open { url: redact_url(url), cause })?;
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&pool).await.map_err(DirectoryError::Migrate)?;
        }
        Ok(Directory { pool, hashing: Arc::new(Semaphore::new(PASSWORD_VERIFICATIONS_CONCURRENT_MAX)) })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn add_domain(&self, name: &str) -> Result<String, DirectoryError> {
        let name = address::check_domain(name)
            .map_err(|cause| DirectoryError::Address { address: name.to_string(), cause })?;
        if self.domain_hosted(&name).await? {
            return Err(DirectoryError::Exists(format!("domain {name}")));
        }
        sqlx::query("INSERT INTO domains (name) VALUES (?)").bind(&name).execute(&self.pool).await?;
        Ok(name)
    }

    pub async fn del_domain(&self, name: &str) -> Result<(), DirectoryError> {
        let name = name.to_lowercase();
        let pattern = format!("%@{name}");
        let users: i64 = sqlx::query("SELECT COUNT(*) FROM mailboxes WHERE domain = ?")
            .bind(&name)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        let aliases: i64 = sqlx::query("SELECT COUNT(*) FROM aliases WHERE source LIKE ?")
            .bind(&pattern)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        if users + aliases > 0 {
            return Err(DirectoryError::DomainInUse(name));
        }
        let done = sqlx::query("DELETE FROM domains WHERE name = ?").bind(&name).execute(&self.pool).await?;
        if done.rows_affected() == 0 {
            return Err(DirectoryError::NotFound(format!("domain {name}")));
        }
        Ok(())
    }

    pub async fn list_domains(&self) -> Result<Vec<String>, DirectoryError> {
        let rows = sqlx::query("SELECT name FROM domains ORDER BY name").fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok(r.try_get::<String, _>(0)?)).collect()
    }

    pub async fn domain_hosted(&self, domain: &str) -> Result<bool, DirectoryError> {
        let row =
            sqlx::query("SELECT name FROM domains WHERE name = ?").bind(domain).fetch_optional(&self.pool).await?;
        Ok(row.is_some())
    }

    /// Adds a mailbox in a hosted domain. The login is the address.
    pub async fn add_user(&self, address: &str, password: &str) -> Result<String, DirectoryError> {
        let a = parse(address)?;
        if !self.domain_hosted(a.domain()).await? {
            return Err(DirectoryError::UnknownDomain(a.domain().to_string()));
        }
        let key = a.key();
        if self.mailbox(&key).await?.is_some() {
            return Err(DirectoryError::Exists(format!("mailbox {key}")));
        }
        let phc = hash_nonempty(password)?;
        sqlx::query("INSERT INTO mailboxes (address, domain, password_hash, enabled) VALUES (?, ?, ?, 1)")
            .bind(&key)
            .bind(a.domain())
            .bind(&phc)
            .execute(&self.pool)
            .await?;
        Ok(key)
    }

    pub async fn set_password(&self, address: &str, password: &str) -> Result<(), DirectoryError> {
        let key = parse(address)?.key();
        let phc = hash_nonempty(password)?;
        let done = sqlx::query("UPDATE mailboxes SET password_hash = ? WHERE address = ?")
            .bind(&phc)
            .bind(&key)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(DirectoryError::NotFound(format!("mailbox {key}")));
        }
        Ok(())
    }

    pub async fn set_enabled(&self, address: &str, enabled: bool) -> Result<(), DirectoryError> {
        let key = parse(address)?.key();
        let done = sqlx::query("UPDATE mailboxes SET enabled = ? WHERE address = ?")
            .bind(i64::from(enabled))
            .bind(&key)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(DirectoryError::NotFound(format!("mailbox {key}")));
        }
        Ok(())
    }

    /// Sets (bytes) or clears (`None`) a mailbox's quota.
    pub async fn set_quota(&self, address: &str, quota_bytes: Option<u64>) -> Result<(), DirectoryError> {
        let key = parse(address)?.key();
        let quota = quota_bytes.map(|q| i64::try_from(q).unwrap_or(i64::MAX));
        let done = sqlx::query("UPDATE mailboxes SET quota_bytes = ? WHERE address = ?")
            .bind(quota)
            .bind(&key)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(DirectoryError::NotFound(format!("mailbox {key}")));
        }
        Ok(())
    }

    /// The quotas of these mailbox keys (those without one are left out).
    pub async fn quotas(&self, mailboxes: &[String]) -> Result<Vec<(String, u64)>, DirectoryError> {
        let mut out = Vec::new();
        for key in mailboxes {
            if let Some((info, _)) = self.mailbox(key).await? {
                if let Some(q) = info.quota_bytes {
                    out.push((key.clone(), u64::try_from(q).unwrap_or(0)));
                }
            }
        }
        Ok(out)
    }

    /// Deletes the mailbox row and its sender-map entries; the Maildir on
    /// disk is left for the admin to archive.
    pub async fn del_user(&self, address: &str) -> Result<(), DirectoryError> {
        let key = parse(address)?.key();
        let done = sqlx::query("DELETE FROM mailboxes WHERE address = ?").bind(&key).execute(&self.pool).await?;
        if done.rows_affected() == 0 {
            return Err(DirectoryError::NotFound(format!("mailbox {key}")));
        }
        sqlx::query("DELETE FROM sender_logins WHERE login = ?").bind(&key).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn list_users(&self) -> Result<Vec<MailboxInfo>, DirectoryError> {
        let rows = sqlx::query("SELECT address, enabled, quota_bytes FROM mailboxes ORDER BY address")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(mailbox_info).collect()
    }

    async fn mailbox(&self, key: &str) -> Result<Option<(MailboxInfo, String)>, DirectoryError> {
        let row = sqlx::query("SELECT address, enabled, quota_bytes, password_hash FROM mailboxes WHERE address = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((mailbox_info(&r)?, r.try_get::<String, _>(3)?))),
        }
    }

    /// `source` is an address or `@domain` (catch-all); `destination` an address.
    pub async fn add_alias(&self, source: &str, destination: &str) -> Result<(String, String), DirectoryError> {
        let (source, domain) = match source.strip_prefix('@') {
            Some(d) => {
                let d = address::check_domain(d)
                    .map_err(|cause| DirectoryError::Address { address: source.to_string(), cause })?;
                (format!("@{d}"), d)
            }
            None => {
                let a = parse(source)?;
                (a.key(), a.domain().to_string())
            }
        };
        if !self.domain_hosted(&domain).await? {
            return Err(DirectoryError::UnknownDomain(domain));
        }
        let destination = parse(destination)?.key();
        let exists = sqlx::query("SELECT source FROM aliases WHERE source = ? AND destination = ?")
            .bind(&source)
            .bind(&destination)
            .fetch_optional(&self.pool)
            .await?;
        if exists.is_some() {
            return Err(DirectoryError::Exists(format!("alias {source} -> {destination}")));
        }
        sqlx::query("INSERT INTO aliases (source, destination) VALUES (?, ?)")
            .bind(&source)
            .bind(&destination)
            .execute(&self.pool)
            .await?;
        Ok((source, destination))
    }

    pub async fn del_alias(&self, source: &str, destination: &str) -> Result<(), DirectoryError> {
        let done = sqlx::query("DELETE FROM aliases WHERE source = ? AND destination = ?")
            .bind(source.to_lowercase())
            .bind(destination.to_lowercase())
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(DirectoryError::NotFound(format!("alias {source} -> {destination}")));
        }
        Ok(())
    }

    pub async fn list_aliases(&self) -> Result<Vec<(String, String)>, DirectoryError> {
        let rows = sqlx::query("SELECT source, destination FROM aliases ORDER BY source, destination")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?))).collect()
    }

    /// Lets `login` use `address` as MAIL FROM (in addition to its own address).
    pub async fn allow_sender(&self, login: &str, address: &str) -> Result<(), DirectoryError> {
        let login = parse(login)?.key();
        let address = parse(address)?.key();
        if self.mailbox(&login).await?.is_none() {
            return Err(DirectoryError::NotFound(format!("mailbox {login}")));
        }
        sqlx::query("DELETE FROM sender_logins WHERE login = ? AND address = ?")
            .bind(&login)
            .bind(&address)
            .execute(&self.pool)
            .await?;
        sqlx::query("INSERT INTO sender_logins (login, address) VALUES (?, ?)")
            .bind(&login)
            .bind(&address)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn deny_sender(&self, login: &str, address: &str) -> Result<(), DirectoryError> {
        let done = sqlx::query("DELETE FROM sender_logins WHERE login = ? AND address = ?")
            .bind(login.to_lowercase())
            .bind(address.to_lowercase())
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(DirectoryError::NotFound(format!("sender permission {login} -> {address}")));
        }
        Ok(())
    }

    pub async fn list_senders(&self) -> Result<Vec<(String, String)>, DirectoryError> {
        let rows = sqlx::query("SELECT login, address FROM sender_logins ORDER BY login, address")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?))).collect()
    }

    /// Checks a login and password. Returns the canonical login on success.
    /// Disabled and unknown logins cost the same time as a wrong password.
    pub async fn verify_login(&self, login: &str, password: &str) -> Result<Option<String>, DirectoryError> {
        // The semaphore is never closed, so acquiring cannot fail.
        let _permit = self.hashing.acquire().await.map_err(|_| DirectoryError::Hash("hashing pool closed".into()))?;
        let key = match Address::parse(login, true) {
            Ok(a) => a.key(),
            Err(_) => {
                let pw = password.to_string();
                let _ = tokio::task::spawn_blocking(move || password::verify_decoy(&pw)).await;
                return Ok(None);
            }
        };
        let stored = self.mailbox(&key).await?;
        let pw = password.to_string();
        let ok = tokio::task::spawn_blocking(move || match &stored {
            Some((info, phc)) if info.enabled => password::verify(phc, &pw),
            _ => password::verify_decoy(&pw),
        })
        .await
        .unwrap_or(false);
        Ok(ok.then_some(key))
    }

    pub async fn sender_facts(&self, login: Option<&str>, address: &Address) -> Result<SenderFacts, DirectoryError> {
        let domain_hosted = self.domain_hosted(address.domain()).await?;
        let key = address.key();
        let owned_by_login = match login {
            None => false,
            Some(l) if l == key => true,
            Some(l) => sqlx::query("SELECT login FROM sender_logins WHERE login = ? AND address = ?")
                .bind(l)
                .bind(&key)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        };
        Ok(SenderFacts { domain_hosted, owned_by_login })
    }

    /// Resolves a recipient to enabled local mailboxes: the mailbox itself,
    /// else its aliases (recursively, bounded), else the domain's catch-all.
    pub async fn recipient_facts(&self, address: &Address) -> Result<RecipientFacts, DirectoryError> {
        let domain_hosted = self.domain_hosted(address.domain()).await?;
        if !domain_hosted {
            return Ok(RecipientFacts { domain_hosted, mailboxes: Vec::new(), over_quota: Vec::new() });
        }
        let key = address.key();
        let mut found = BTreeSet::new();
        self.expand(&key, 0, &mut found).await?;
        if found.is_empty() && self.mailbox(&key).await?.is_none() {
            self.expand(&format!("@{}", address.domain()), 0, &mut found).await?;
        }
        // Quota use is on disk: the caller fills in `over_quota`.
        Ok(RecipientFacts { domain_hosted, mailboxes: found.into_iter().collect(), over_quota: Vec::new() })
    }

    /// RFC 5321 §4.5.1: `postmaster@` every hosted domain must be accepted.
    /// Facts for `address` as [`Directory::recipient_facts`] gives them;
    /// when it is `postmaster@` a hosted domain without its own mailbox or
    /// alias, the mail goes to `postmaster_to` (a local address), else to
    /// the domain's first enabled mailbox by address.
    pub async fn recipient_facts_with_postmaster(
        &self,
        address: &Address,
        postmaster_to: Option<&Address>,
    ) -> Result<RecipientFacts, DirectoryError> {
        let facts = self.recipient_facts(address).await?;
        if !facts.domain_hosted || !facts.mailboxes.is_empty() || !address.local().eq_ignore_ascii_case("postmaster") {
            return Ok(facts);
        }
        let mut mailboxes = match postmaster_to {
            Some(to) => self.recipient_facts(to).await?.mailboxes,
            None => Vec::new(),
        };
        if mailboxes.is_empty() {
            let suffix = format!("@{}", address.domain().to_ascii_lowercase());
            mailboxes = self
                .list_users()
                .await?
                .into_iter()
                .find(|u| u.enabled && u.address.ends_with(&suffix))
                .map(|u| vec![u.address])
                .unwrap_or_default();
        }
        Ok(RecipientFacts { mailboxes, ..facts })
    }

    async fn expand(&self, key: &str, depth: usize, found: &mut BTreeSet<String>) -> Result<(), DirectoryError> {
        if depth > ALIAS_DEPTH_MAX || found.len() >= ALIAS_FANOUT_MAX {
            return Ok(());
        }
        if let Some((info, _)) = self.mailbox(key).await? {
            if info.enabled {
                found.insert(info.address);
            }
            return Ok(());
        }
        let rows =
            sqlx::query("SELECT destination FROM aliases WHERE source = ?").bind(key).fetch_all(&self.pool).await?;
        for r in rows {
            let dest: String = r.try_get(0)?;
            Box::pin(self.expand(&dest, depth + 1, found)).await?;
        }
        Ok(())
    }
}

fn parse(address: &str) -> Result<Address, DirectoryError> {
    Address::parse(address, true).map_err(|cause| DirectoryError::Address { address: address.to_string(), cause })
}

fn hash_nonempty(password: &str) -> Result<String, DirectoryError> {
    if password.is_empty() {
        return Err(DirectoryError::EmptyPassword);
    }
    password::hash(password)
}

fn mailbox_info(r: &AnyRow) -> Result<MailboxInfo, DirectoryError> {
    Ok(MailboxInfo {
        address: r.try_get(0)?,
        enabled: r.try_get::<i64, _>(1)? != 0,
        quota_bytes: r.try_get::<Option<i64>, _>(2)?,
    })
}

/// A URL with any password replaced, for error messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme_end + 3], &userinfo[..colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests;
