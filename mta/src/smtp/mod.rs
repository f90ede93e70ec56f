//! The SMTP protocol core: parsing, replies, policy and the session state
//! machine. **Invariant:** nothing under `smtp/` touches sockets, files,
//! clocks or the directory; the shell answers the session's queries.

pub mod address;
pub mod command;
pub mod fuzz;
pub mod policy;
pub mod reply;
pub mod session;
