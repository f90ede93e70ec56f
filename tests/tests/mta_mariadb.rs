//! The MySQL/MariaDB directory path: a private MariaDB server started by
//! the test (its own data directory, socket and port), a database and user
//! created with SQL, and the `mta` CLI and server using it by URL.

use std::time::Duration;

use tests::mta::{swaks, MailTree};
use tests::server::{free_port, Daemon};
use tests::{cmd, require_tools, run, run_output, wait_until, TestDir};

struct MariaDb {
    _daemon: Daemon,
    socket: std::path::PathBuf,
    port: u16,
}

fn start_mariadb(dir: &TestDir) -> MariaDb {
    let data = dir.join("db");
    let socket = dir.join("mysqld.sock");
    run(&mut cmd(
        "mariadb-install-db",
        [
            "--no-defaults",
            &format!("--datadir={}", data.display()),
            "--user=root",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
        ],
    ))
    .unwrap();
    let port = free_port().unwrap();
    let daemon = Daemon::spawn(cmd(
        "mariadbd",
        [
            "--no-defaults".to_string(),
            format!("--datadir={}", data.display()),
            format!("--socket={}", socket.display()),
            format!("--pid-file={}", dir.join("mysqld.pid").display()),
            format!("--port={port}"),
            "--bind-address=127.0.0.1".to_string(),
            "--user=root".to_string(),
            "--skip-log-bin".to_string(),
            "--innodb-buffer-pool-size=16M".to_string(),
        ],
    ))
    .unwrap();
    let sock = socket.display().to_string();
    wait_until(Duration::from_secs(60), "MariaDB to answer", || {
        run_output(
            &mut cmd("mariadb", ["--no-defaults", "-S", &sock, "-u", "root", "-e", "select 1"]),
            Duration::from_secs(10),
        )
        .map(|o| o.success())
        .unwrap_or(false)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n--- mariadbd log ---\n{}", daemon.logs.text()));
    MariaDb { _daemon: daemon, socket, port }
}

#[test]
fn mariadb_directory_serves_auth_and_local_delivery() {
    require_tools!("mariadbd", "mariadb-install-db", "mariadb", "swaks");
    let dbdir = TestDir::new("mta-mariadb");
    let db = start_mariadb(&dbdir);
    let sql = "CREATE DATABASE mail CHARACTER SET utf8mb4; \
               CREATE USER 'mta'@'127.0.0.1' IDENTIFIED BY 'db-secret-pw'; \
               GRANT ALL ON mail.* TO 'mta'@'127.0.0.1';";
    run(&mut cmd("mariadb", ["--no-defaults", "-S", db.socket.to_str().unwrap(), "-u", "root", "-e", sql])).unwrap();

    let url = format!("directory_url = \"mysql://mta:db-secret-pw@127.0.0.1:{}/mail\"", db.port);
    let tree = MailTree::new("mta-mariadb-tree", &url, None).unwrap();
    let check = tree.admin(&["check-config"]).unwrap();
    assert!(check.stdout.contains("directory: mysql://mta:***@127.0.0.1"), "{}", check.stdout);
    assert!(!check.stdout.contains("db-secret-pw"), "{}", check.stdout);
    tree.populate().unwrap();
    tree.admin(&["alias", "add", "team@example.org", "bob@example.org"]).unwrap();
    assert!(!tree.data.join("directory.sqlite3").exists(), "the SQLite default must not be used");

    // The rows are in MariaDB, with an Argon2id hash.
    let out = run(&mut cmd(
        "mariadb",
        [
            "--no-defaults",
            "-S",
            db.socket.to_str().unwrap(),
            "-u",
            "root",
            "-N",
            "-e",
            "SELECT address, password_hash FROM mail.mailboxes ORDER BY address",
        ],
    ))
    .unwrap();
    assert!(out.stdout.contains("alice@example.org\t$argon2id$"), "{}", out.stdout);

    let mta = tree.serve().unwrap();
    let out = swaks(
        mta.submission(),
        &[
            "-tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice@example.org",
            "--auth-password",
            "alice-pw",
            "--from",
            "alice@example.org",
            "--to",
            "team@example.org",
        ],
    )
    .unwrap();
    assert!(out.success(), "{}", out.describe());
    let out = swaks(mta.mx(), &["--from", "x@remote.example", "--to", "nobody@example.org"]).unwrap();
    assert!(out.stdout.contains("550 5.1.1") || out.stderr.contains("550 5.1.1"), "{}", out.describe());
    tree.wait_messages("bob@example.org", 1, Duration::from_secs(30)).unwrap();
}
