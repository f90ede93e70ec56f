//! Directory behaviour against a real SQLite file.

use super::*;

struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn fresh(name: &str) -> (Directory, Scratch) {
    let dir = std::env::temp_dir().join(format!("mta-dir-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("directory.sqlite3").display());
    (Directory::open(&url).await.unwrap(), Scratch(dir))
}

fn a(s: &str) -> Address {
    Address::parse(s, true).unwrap()
}

#[tokio::test]
async fn users_need_a_hosted_domain_and_authenticate_with_argon2() {
    let (d, _s) = fresh("auth").await;
    assert!(matches!(d.add_user("alice@example.org", "pw").await, Err(DirectoryError::UnknownDomain(_))));
    assert_eq!(d.add_domain("Example.ORG").await.unwrap(), "example.org");
    assert!(matches!(d.add_domain("example.org").await, Err(DirectoryError::Exists(_))));
    assert_eq!(d.add_user("Alice@example.org", "pw").await.unwrap(), "alice@example.org");
    assert!(matches!(d.add_user("alice@example.org", "x").await, Err(DirectoryError::Exists(_))));
    assert!(matches!(d.add_user("bob@example.org", "").await, Err(DirectoryError::EmptyPassword)));

    assert_eq!(d.verify_login("ALICE@example.org", "pw").await.unwrap().as_deref(), Some("alice@example.org"));
    assert_eq!(d.verify_login("alice@example.org", "PW").await.unwrap(), None);
    assert_eq!(d.verify_login("nobody@example.org", "pw").await.unwrap(), None);
    assert_eq!(d.verify_login("not an address", "pw").await.unwrap(), None);

    d.set_password("alice@example.org", "new").await.unwrap();
    assert_eq!(d.verify_login("alice@example.org", "pw").await.unwrap(), None);
    assert!(d.verify_login("alice@example.org", "new").await.unwrap().is_some());

    d.set_enabled("alice@example.org", false).await.unwrap();
    assert_eq!(d.verify_login("alice@example.org", "new").await.unwrap(), None);
    let users = d.list_users().await.unwrap();
    assert_eq!(users, vec![MailboxInfo { address: "alice@example.org".into(), enabled: false, quota_bytes: None }]);
    d.set_quota("Alice@example.org", Some(5000)).await.unwrap();
    assert_eq!(d.list_users().await.unwrap()[0].quota_bytes, Some(5000));
    let keys = vec!["alice@example.org".to_string(), "nobody@example.org".to_string()];
    assert_eq!(d.quotas(&keys).await.unwrap(), vec![("alice@example.org".to_string(), 5000)]);
    d.set_quota("alice@example.org", None).await.unwrap();
    assert!(d.quotas(&keys).await.unwrap().is_empty());
    assert!(matches!(d.set_quota("nobody@example.org", Some(1)).await, Err(DirectoryError::NotFound(_))));

    // The stored hash is a PHC string, never the password.
    let (_, phc) = d.mailbox("alice@example.org").await.unwrap().unwrap();
    assert!(phc.starts_with("$argon2id$"));
    assert!(!phc.contains("new"));
}

#[tokio::test]
async fn recipients_resolve_through_aliases_and_catch_alls() {
    let (d, _s) = fresh("rcpt").await;
    d.add_domain("example.org").await.unwrap();
    d.add_domain("example.net").await.unwrap();
    d.add_user("alice@example.org", "pw").await.unwrap();
    d.add_user("bob@example.org", "pw").await.unwrap();
    d.add_alias("sales@example.org", "alice@example.org").await.unwrap();
    d.add_alias("sales@example.org", "bob@example.org").await.unwrap();
    d.add_alias("team@example.org", "sales@example.org").await.unwrap();
    d.add_alias("@example.net", "bob@example.org").await.unwrap();
    assert!(matches!(
        d.add_alias("x@elsewhere.example", "bob@example.org").await,
        Err(DirectoryError::UnknownDomain(_))
    ));
    // A loop terminates.
    d.add_alias("loop1@example.org", "loop2@example.org").await.unwrap();
    d.add_alias("loop2@example.org", "loop1@example.org").await.unwrap();

    let facts = |mailboxes: &[&str]| RecipientFacts {
        domain_hosted: true,
        mailboxes: mailboxes.iter().map(|s| s.to_string()).collect(),
        over_quota: vec![],
    };
    assert_eq!(d.recipient_facts(&a("Alice@Example.org")).await.unwrap(), facts(&["alice@example.org"]));
    assert_eq!(
        d.recipient_facts(&a("team@example.org")).await.unwrap(),
        facts(&["alice@example.org", "bob@example.org"])
    );
    assert_eq!(d.recipient_facts(&a("anything@example.net")).await.unwrap(), facts(&["bob@example.org"]));
    assert_eq!(d.recipient_facts(&a("nobody@example.org")).await.unwrap(), facts(&[]));
    assert_eq!(d.recipient_facts(&a("loop1@example.org")).await.unwrap(), facts(&[]));
    assert_eq!(
        d.recipient_facts(&a("x@remote.example")).await.unwrap(),
        RecipientFacts { domain_hosted: false, mailboxes: vec![], over_quota: vec![] }
    );
    d.set_enabled("bob@example.org", false).await.unwrap();
    assert_eq!(d.recipient_facts(&a("sales@example.org")).await.unwrap(), facts(&["alice@example.org"]));
}

#[tokio::test]
async fn sender_ownership_follows_the_login_map() {
    let (d, _s) = fresh("sender").await;
    d.add_domain("example.org").await.unwrap();
    d.add_user("alice@example.org", "pw").await.unwrap();
    d.allow_sender("alice@example.org", "sales@example.org").await.unwrap();
    let f = d.sender_facts(Some("alice@example.org"), &a("Sales@example.org")).await.unwrap();
    assert_eq!(f, SenderFacts { domain_hosted: true, owned_by_login: true });
    let f = d.sender_facts(Some("alice@example.org"), &a("bob@example.org")).await.unwrap();
    assert_eq!(f, SenderFacts { domain_hosted: true, owned_by_login: false });
    let f = d.sender_facts(None, &a("alice@example.org")).await.unwrap();
    assert_eq!(f, SenderFacts { domain_hosted: true, owned_by_login: false });
    let f = d.sender_facts(Some("alice@example.org"), &a("alice@example.org")).await.unwrap();
    assert!(f.owned_by_login);
    d.deny_sender("alice@example.org", "sales@example.org").await.unwrap();
    assert!(!d.sender_facts(Some("alice@example.org"), &a("sales@example.org")).await.unwrap().owned_by_login);
}

#[tokio::test]
async fn domains_in_use_cannot_be_deleted() {
    let (d, _s) = fresh("domains").await;
    d.add_domain("example.org").await.unwrap();
    d.add_user("alice@example.org", "pw").await.unwrap();
    assert!(matches!(d.del_domain("example.org").await, Err(DirectoryError::DomainInUse(_))));
    d.del_user("alice@example.org").await.unwrap();
    d.del_domain("example.org").await.unwrap();
    assert!(d.list_domains().await.unwrap().is_empty());
    assert!(matches!(d.del_domain("example.org").await, Err(DirectoryError::NotFound(_))));
    assert!(matches!(d.add_domain("[127.0.0.1]").await, Err(DirectoryError::Address { .. })));
}

#[test]
fn urls_are_redacted() {
    assert_eq!(redact_url("mysql://mta:s3cret@db:3306/mail"), "mysql://mta:***@db:3306/mail");
    assert_eq!(redact_url("sqlite:///var/mail/directory.sqlite3"), "sqlite:///var/mail/directory.sqlite3");
}
