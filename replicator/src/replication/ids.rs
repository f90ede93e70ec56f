//! The identifiers the replication core and its shell share: an
//! application request (`AppId`), a disk operation (`IoId`) and a link to
//! the peer (`LinkId`). Their own module so that the apply queue, the
//! resync and the link need not import the replica.

pub type AppId = u64;
pub type IoId = u64;
pub type LinkId = u64;
