//! Rate limiting of failed AUTH attempts, per client IP and per login, with
//! growing delays. Time is passed in (`now`), so the rules are unit-tested
//! without sleeping.
//!
//! Main type: [`AuthLimiter`]. The shell asks [`AuthLimiter::delay`] before
//! verifying, waits that long, then records the outcome.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::limits::{
    AUTH_DELAY_MS_MAX, AUTH_DELAY_MS_MIN, AUTH_FAILURES_FREE_MAX, AUTH_FAILURE_WINDOW_SECS, AUTH_LIMITER_ENTRIES_MAX,
};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Ip(IpAddr),
    Login(String),
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

#[derive(Debug, Default)]
pub struct AuthLimiter {
    failures: HashMap<Key, Failures>,
}

fn delay_for(count: u32) -> Duration {
    if count < AUTH_FAILURES_FREE_MAX {
        return Duration::ZERO;
    }
    let doublings = (count - AUTH_FAILURES_FREE_MAX).min(16);
    Duration::from_millis((AUTH_DELAY_MS_MIN << doublings).min(AUTH_DELAY_MS_MAX))
}

impl AuthLimiter {
    pub fn new() -> AuthLimiter {
        AuthLimiter::default()
    }

    fn count(&self, key: &Key, now: Instant) -> u32 {
        match self.failures.get(key) {
            Some(f) if now.duration_since(f.last) < Duration::from_secs(AUTH_FAILURE_WINDOW_SECS) => f.count,
            _ => 0,
        }
    }

    /// How long to wait before checking this attempt's password: the larger
    /// of the IP's and the login's delay.
    pub fn delay(&self, ip: IpAddr, login: &str, now: Instant) -> Duration {
        let by_ip = self.count(&Key::Ip(ip), now);
        let by_login = self.count(&Key::Login(login.to_lowercase()), now);
        delay_for(by_ip.max(by_login))
    }

    pub fn record_failure(&mut self, ip: IpAddr, login: &str, now: Instant) {
        if self.failures.len() >= AUTH_LIMITER_ENTRIES_MAX {
            let window = Duration::from_secs(AUTH_FAILURE_WINDOW_SECS);
            self.failures.retain(|_, f| now.duration_since(f.last) < window);
            if self.failures.len() >= AUTH_LIMITER_ENTRIES_MAX {
                // Under a flood of distinct keys, forget everything rather
                // than grow without bound; delays restart from zero.
                self.failures.clear();
            }
        }
        for key in [Key::Ip(ip), Key::Login(login.to_lowercase())] {
            let count = self.count(&key, now) + 1;
            self.failures.insert(key, Failures { count, last: now });
        }
    }

    /// A success clears the login's record, not the IP's: one good password
    /// must not reset the brute-force counter of a shared source.
    pub fn record_success(&mut self, login: &str) {
        self.failures.remove(&Key::Login(login.to_lowercase()));
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const OTHER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn delays_grow_per_ip_and_per_login_and_are_capped() {
        let mut l = AuthLimiter::new();
        let t = Instant::now();
        for _ in 0..AUTH_FAILURES_FREE_MAX {
            assert_eq!(l.delay(IP, "alice", t), Duration::ZERO);
            l.record_failure(IP, "alice", t);
        }
        assert_eq!(l.delay(IP, "bob", t), Duration::from_millis(AUTH_DELAY_MS_MIN));
        // The login is limited from another IP too.
        assert_eq!(l.delay(OTHER_IP, "ALICE", t), Duration::from_millis(AUTH_DELAY_MS_MIN));
        assert_eq!(l.delay(OTHER_IP, "bob", t), Duration::ZERO);
        l.record_failure(IP, "alice", t);
        assert_eq!(l.delay(IP, "alice", t), Duration::from_millis(2 * AUTH_DELAY_MS_MIN));
        for _ in 0..40 {
            l.record_failure(IP, "alice", t);
        }
        assert_eq!(l.delay(IP, "alice", t), Duration::from_millis(AUTH_DELAY_MS_MAX));
    }

    #[test]
    fn records_expire_and_success_clears_the_login_only() {
        let mut l = AuthLimiter::new();
        let t = Instant::now();
        for _ in 0..5 {
            l.record_failure(IP, "alice", t);
        }
        l.record_success("alice");
        assert_eq!(l.delay(OTHER_IP, "alice", t), Duration::ZERO);
        assert!(l.delay(IP, "bob", t) > Duration::ZERO);
        let later = t + Duration::from_secs(AUTH_FAILURE_WINDOW_SECS + 1);
        assert_eq!(l.delay(IP, "bob", later), Duration::ZERO);
    }

    #[test]
    fn memory_is_bounded() {
        let mut l = AuthLimiter::new();
        let t = Instant::now();
        for i in 0..(AUTH_LIMITER_ENTRIES_MAX as u32) {
            l.record_failure(IP, &format!("user{i}"), t);
        }
        assert!(l.failures.len() <= AUTH_LIMITER_ENTRIES_MAX + 1);
    }
}
