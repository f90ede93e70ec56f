//! The `Received:` trace header (RFC 5321 §4.4) prepended to each queued
//! message, with the protocol keyword of RFC 3848 (ESMTPSA = TLS + AUTH).

use crate::smtp::session::Envelope;

/// `Sat, 28 Nov 2026 08:17:14 +0000` (RFC 5322 §3.3), always UTC.
pub fn rfc5322_date(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days.rem_euclid(7)) as usize];
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][(m - 1) as usize];
    format!("{weekday}, {d} {month} {y} {:02}:{:02}:{:02} +0000", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

pub fn header(envelope: &Envelope, hostname: &str, id: &str, unix_secs: u64) -> String {
    let protocol = match (envelope.smtputf8, envelope.tls, envelope.login.is_some()) {
        (false, false, false) => "ESMTP",
        (false, true, false) => "ESMTPS",
        (false, false, true) => "ESMTPA",
        (false, true, true) => "ESMTPSA",
        (true, false, false) => "UTF8SMTP",
        (true, true, false) => "UTF8SMTPS",
        (true, false, true) => "UTF8SMTPA",
        (true, true, true) => "UTF8SMTPSA",
    };
    // The HELO name is client input: the parser allows no spaces or
    // controls, and we drop anything that could end the header line anyway.
    let helo: String = envelope.helo.chars().filter(|c| !c.is_control()).take(255).collect();
    format!(
        "Received: from {helo} ([{}])\r\n\tby {hostname} with {protocol} id {id};\r\n\t{}\r\n",
        envelope.peer,
        rfc5322_date(unix_secs)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc5322_utc() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(rfc5322_date(1_795_853_834), "Sat, 28 Nov 2026 08:17:14 +0000");
    }
}
