//! The arrangement the mta delivery tests share: a receiving `mta` with
//! its mailboxes, a route to it (a relay host, or MX lookup through the
//! fake DNS), and a sending `mta` whose user alice submits the mail.
//!
//! Tests whose receiver is not an `mta` (`smtp-sink`, a scripted server)
//! use the route and sender halves only.

use std::net::SocketAddr;

use anyhow::{bail, Result};

use crate::mta::{fake_dns, swaks, MailTree, Mta};
use crate::server::Daemon;

/// A receiving `mta` holding `mailboxes` (see [`MailTree::add_mailboxes`]),
/// served. It has no route of its own: it only takes mail.
pub fn receiver(name: &str, mailboxes: &[&str]) -> Result<(MailTree, Mta)> {
    let tree = MailTree::new(name, "", None)?;
    tree.add_mailboxes(mailboxes)?;
    let mta = tree.serve()?;
    Ok((tree, mta))
}

/// How a sender reaches its receiver: the keys that open its `[delivery]` table.
#[derive(Clone, Copy, Debug)]
pub enum Route {
    /// `relay_host`: all remote mail goes to this address.
    Relay(SocketAddr),
    /// MX lookup through the fake DNS on `dns_port` (see [`fake_mx`]),
    /// connecting to `mx_port` on the MX host: the receiver listens on an
    /// ephemeral port, not 25.
    Mx { dns_port: u16, mx_port: u16 },
}

impl Route {
    /// The `[delivery]` table for this route, followed by `extra`: more
    /// `[delivery]` keys, then any sub-table such as `[delivery.tls_policy]`.
    pub fn delivery(self, extra: &str) -> String {
        let route = match self {
            Route::Relay(addr) => format!("relay_host = \"{addr}\""),
            Route::Mx { dns_port, mx_port } => format!("dns_server = \"127.0.0.1:{dns_port}\"\nmx_port = {mx_port}"),
        };
        format!("[delivery]\n{route}\n{extra}")
    }
}

/// A sending mail tree routing remote mail by `route` (with `extra`, see
/// [`Route::delivery`]), populated with alice and bob. Not yet served, so
/// a test can run `check-config` first.
pub fn sender(name: &str, route: Route, extra: &str) -> Result<MailTree> {
    let tree = MailTree::new(name, &route.delivery(extra), None)?;
    tree.populate()?;
    Ok(tree)
}

/// The fake DNS zone for [`Route::Mx`]: each `(domain, host)` gets MX 10
/// `host`, and every host resolves to 127.0.0.1, where the receiver
/// listens. Returns the server (killed on drop) and its UDP port.
pub fn fake_mx(routes: &[(&str, &str)]) -> Result<(Daemon, u16)> {
    let mx: Vec<(&str, u16, &str)> = routes.iter().map(|&(domain, host)| (domain, 10, host)).collect();
    let mut a: Vec<(&str, &str)> = Vec::new();
    for &(_, host) in routes {
        if !a.iter().any(|&(known, _)| known == host) {
            a.push((host, "127.0.0.1"));
        }
    }
    fake_dns(&mx, &a, &[])
}

/// alice@example.org submits a message with `subject` to `to` (comma
/// separated) on the sender's submissions port: implicit TLS, AUTH PLAIN.
/// Fails with swaks' output unless the sender accepted it.
pub fn submit(sender: &Mta, to: &str, subject: &str) -> Result<()> {
    let out = swaks(
        sender.submissions(),
        &[
            "-tlsc",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice@example.org",
            "--auth-password",
            "alice-pw",
            "--from",
            "alice@example.org",
            "--to",
            to,
            "--header",
            &format!("Subject: {subject}"),
        ],
    )?;
    if !out.success() {
        bail!("{}", out.describe());
    }
    Ok(())
}
