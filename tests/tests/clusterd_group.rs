//! clusterd's resource-group layer against a real replicated volume: the
//! volume commands (`Volume`: status, demote, promote with an epoch,
//! suspend/resume I/O) and a group of attach → fsck + mount on the
//! primary. Needs root (network namespaces, mount).

use std::time::Duration;

use clusterd::group::{self, GroupContext, GroupEvent, GroupSection, Volume};
use tests::pair::{Pair, PairOptions};
use tests::server::replicator_bin;
use tests::{have_root, require_tools, run, TestDir};

const EVENT_WAIT: Duration = Duration::from_secs(90);

fn volume(pair: &Pair, node: &str) -> Volume {
    Volume {
        replicator: replicator_bin(),
        resource: pair.res.display().to_string(),
        node: Some(node.into()),
        timeout_ms: 30_000,
    }
}

fn mounted(dir: &std::path::Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines().any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap()))
}

async fn next_event(rx: &mut tokio::sync::mpsc::Receiver<GroupEvent>, what: &str) -> GroupEvent {
    match tokio::time::timeout(EVENT_WAIT, rx.recv()).await {
        Ok(Some(e)) => e,
        Ok(None) => panic!("event channel closed waiting for {what}"),
        Err(_) => panic!("no event within {EVENT_WAIT:?} waiting for {what}"),
    }
}

#[test]
fn volume_commands_and_attach_filesystem_group_on_the_primary() {
    if !have_root("network namespaces, attach and mount") {
        return;
    }
    require_tools!("mkfs.ext4", "fsck");
    let dir = TestDir::new("cd-group");
    let mut pair = Pair::new(&dir, &PairOptions::default()).unwrap();
    pair.bring_up().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (a, b) = (volume(&pair, "a"), volume(&pair, "b"));

    rt.block_on(async {
        // The fields clusterd reads, from the real `status --json`.
        let s = a.status().await.unwrap();
        assert!(s.is_primary(), "{s:?}");
        assert_eq!(s.disk_state(), Some(clusterd::failover::DiskState::UpToDate));
        assert_eq!(s.peer_disk_state(), Some(clusterd::failover::DiskState::UpToDate));
        assert_eq!(s.connection.as_str(), "Connected");
        assert!(!s.suspended);
        let sb = b.status().await.unwrap();
        assert_eq!(sb.role.as_str(), "Secondary");

        // Planned switch: demote a, promote b with the next epoch.
        a.demote().await.unwrap();
        assert_eq!(a.status().await.unwrap().role.as_str(), "Secondary");
        let epoch = s.epoch.max(sb.epoch) + 1;
        b.promote(epoch).await.unwrap();
        let sb = b.status().await.unwrap();
        assert!(sb.is_primary() && sb.epoch == epoch, "{sb:?}");
        // A promotion with an epoch that is not newer is refused, and the
        // error carries the CLI's words (with b demoted first: while b is
        // primary the replicator refuses for that reason before it looks at
        // the epoch).
        b.demote().await.unwrap();
        let err = a.promote(epoch).await.unwrap_err();
        assert!(err.to_string().contains("epoch"), "{err}");
        a.promote(epoch + 1).await.unwrap();

        // Freeze/resume: `suspend-io` may not exist in this replicator yet.
        match a.freeze().await {
            Ok(()) => {
                assert!(a.status().await.unwrap().suspended, "suspend-io did not suspend");
                a.resume().await.unwrap();
                assert!(!a.status().await.unwrap().suspended, "resume-io did not resume");
            }
            Err(e) => assert!(e.to_string().contains("suspend-io"), "the error names the command: {e}"),
        }
    });

    // A file system on the volume, made through a device of our own.
    let attach =
        run(std::process::Command::new(replicator_bin()).arg("attach").arg(&pair.res).args(["--node", "a"])).unwrap();
    assert!(attach.success(), "attach: {}", attach.describe());
    let device = attach.stdout.trim().to_owned();
    let mkfs = run(std::process::Command::new("mkfs.ext4").args(["-q", "-F", &device])).unwrap();
    assert!(mkfs.success(), "mkfs: {}", mkfs.describe());
    let detach = run(std::process::Command::new(replicator_bin()).args(["detach", &device])).unwrap();
    assert!(detach.success(), "detach: {}", detach.describe());

    let mnt = dir.join("mnt");
    let toml = format!(
        "name = \"mail\"\nvolume = \"{res}\"\nreplicator = \"{bin}\"\n\
         [[resource]]\nname = \"disk\"\nkind = \"attach\"\nmonitor_interval_ms = 300\n\
         [[resource]]\nname = \"fs\"\nkind = \"filesystem\"\ndevice = \"@attach\"\ndirectory = \"{mnt}\"\n\
         fstype = \"ext4\"\nmonitor_interval_ms = 300\n",
        res = pair.res.display(),
        bin = replicator_bin().display(),
        mnt = mnt.display()
    );
    let spec = toml::from_str::<GroupSection>(&toml).unwrap().validate(true).unwrap();
    let mut ctx = GroupContext::new(dir.join("run"));
    ctx.node = Some("a".into());
    rt.block_on(async {
        let (h, mut rx) = group::spawn(spec, ctx);
        h.start().await.unwrap();
        assert_eq!(next_event(&mut rx, "Started").await, GroupEvent::Started);
        assert!(mounted(&mnt), "not mounted");
        std::fs::write(mnt.join("mail"), b"through the group").unwrap();
        let record = dir.join("run/mail/disk.device");
        assert!(std::fs::read_to_string(&record).unwrap().starts_with("/dev/"), "no device record");
        h.stop().await.unwrap();
        assert_eq!(next_event(&mut rx, "Stopped").await, GroupEvent::Stopped);
        assert!(!mounted(&mnt), "still mounted");
        assert!(!record.exists(), "device record left after detach");
        // Started again (fsck, mount), the data is there.
        h.start().await.unwrap();
        assert_eq!(next_event(&mut rx, "Started").await, GroupEvent::Started);
        assert_eq!(std::fs::read(mnt.join("mail")).unwrap(), b"through the group");
        h.stop().await.unwrap();
        assert_eq!(next_event(&mut rx, "Stopped").await, GroupEvent::Stopped);
    });
    if mounted(&mnt) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&mnt).status();
    }
}
