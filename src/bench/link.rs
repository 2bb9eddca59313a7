//! Link profiles for the bench: parsing the named profiles `lan`, `dc` and `edge`, and `unlimited`,
//! `20mbit:50ms`, `500kbit:200ms`, `1gbit`, into the test bed's [`LinkProfile`] (rate, and
//! round-trip time split into two one-way delays).

use std::fmt;
use std::time::Duration;

use crate::rig::LinkProfile;

use super::BenchError;

/// One emulated link as the user wrote it, with the profile it stands for.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkSpec {
    /// The text given on the command line, normalized (`unlimited`, `20mbit:50ms`).
    pub label: String,
    /// Throughput limit in bits per second; `None` for unlimited.
    pub rate_bits_per_sec: Option<u64>,
    /// Round-trip time added by the link.
    pub rtt: Duration,
    /// Up to this much more one-way delay, at random, per piece of data.
    pub jitter: Duration,
    /// Share of the pieces of data lost, 0 to 1 (see [`LinkProfile::loss`]).
    pub loss: f64,
}

/// The named profiles and what each stands for: an unshaped LAN, a datacenter link, and the edge
/// node of the problem statement (where an nginx pull takes 30 s).
pub const NAMED_LINKS: [(&str, &str); 3] = [
    ("lan", "unlimited"),
    ("dc", "100mbit:20ms"),
    ("edge", "10mbit:100ms"),
];

impl LinkSpec {
    /// Parses a named profile (see [`NAMED_LINKS`]), `unlimited`, `RATE`, `RATE:RTT` or
    /// `unlimited:RTT`, where RATE is a number with `kbit`, `mbit` or `gbit` and RTT a number with
    /// `ms` or `s` (the round-trip time), optionally followed by `:JITTER` (a time: up to that
    /// much more one-way delay at random) and `:LOSS%` (the share of data lost), e.g.
    /// `10mbit:100ms:20ms:1%`. A named profile is labelled by what it stands for.
    pub fn parse(text: &str) -> Result<Self, BenchError> {
        let bad = |reason: &str| BenchError::BadLink {
            spec: text.to_string(),
            reason: reason.to_string(),
        };
        let mut trimmed = text.trim().to_ascii_lowercase();
        if let Some((_, spec)) = NAMED_LINKS.iter().find(|(name, _)| *name == trimmed) {
            trimmed = spec.to_string();
        }
        if trimmed.is_empty() {
            return Err(bad("empty"));
        }
        let mut parts = trimmed.split(':');
        let rate_text = parts.next().unwrap_or_default();
        let rtt_text = parts.next();
        let mut jitter = Duration::ZERO;
        let mut loss = 0.0;
        for extra in parts {
            if let Some(percent) = extra.strip_suffix('%') {
                loss = percent
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=50.0).contains(p))
                    .ok_or_else(|| bad("the loss must be a percentage from 0% to 50%"))?
                    / 100.0;
            } else {
                jitter = parse_duration(extra)
                    .filter(|j| *j <= Duration::from_secs(5))
                    .ok_or_else(|| {
                        bad("after RATE:RTT come a jitter (a time up to 5 s) and a loss (a percentage)")
                    })?;
            }
        }
        let rate_bits_per_sec = if rate_text == "unlimited" {
            None
        } else {
            Some(parse_rate(rate_text).ok_or_else(|| {
                bad(
                    "the rate must be `unlimited` or a number with kbit, mbit or gbit \
                     (or the link one of the profiles lan, dc, edge)",
                )
            })?)
        };
        let rtt = match rtt_text {
            None => Duration::ZERO,
            Some(rtt) => parse_duration(rtt)
                .ok_or_else(|| bad("the round-trip time must be a number with ms or s"))?,
        };
        if rtt > Duration::from_secs(10) {
            return Err(bad("round-trip times above 10 s are not useful here"));
        }
        Ok(Self {
            label: trimmed,
            rate_bits_per_sec,
            rtt,
            jitter,
            loss,
        })
    }

    /// The test bed profile: shared rate limit per direction, half the RTT as one-way delay.
    pub fn profile(&self) -> LinkProfile {
        LinkProfile {
            rate_bytes_per_sec: self.rate_bits_per_sec.map(|bits| (bits / 8).max(1)),
            one_way_delay: self.rtt / 2,
            jitter: self.jitter,
            loss: self.loss,
        }
    }

    /// A file-name-safe form of the label.
    pub fn slug(&self) -> String {
        self.label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect()
    }
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

fn parse_rate(text: &str) -> Option<u64> {
    let (number, multiplier) = [
        ("gbit", 1_000_000_000f64),
        ("mbit", 1_000_000f64),
        ("kbit", 1_000f64),
    ]
    .iter()
    .find_map(|(suffix, mult)| text.strip_suffix(suffix).map(|n| (n, *mult)))?;
    let value: f64 = number.trim().parse().ok()?;
    if !value.is_finite() || value <= 0.0 {
        return None;
    }
    let bits = value * multiplier;
    (8.0..1e15).contains(&bits).then_some(bits as u64)
}

fn parse_duration(text: &str) -> Option<Duration> {
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        return None;
    };
    let value: f64 = number.trim().parse().ok()?;
    if !value.is_finite() || !(0.0..=1e6).contains(&value) {
        return None;
    }
    Some(Duration::from_secs_f64(value * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates_and_round_trip_times() {
        let link = LinkSpec::parse("20mbit:50ms").unwrap();
        assert_eq!(link.rate_bits_per_sec, Some(20_000_000));
        assert_eq!(link.rtt, Duration::from_millis(50));
        assert_eq!(link.profile().rate_bytes_per_sec, Some(2_500_000));
        assert_eq!(link.profile().one_way_delay, Duration::from_millis(25));
        assert_eq!(link.slug(), "20mbit-50ms");

        let unlimited = LinkSpec::parse("unlimited").unwrap();
        assert_eq!(unlimited.profile(), LinkProfile::unlimited());
        assert_eq!(
            LinkSpec::parse("1.5Gbit:0.2s").unwrap().rtt,
            Duration::from_millis(200)
        );
        assert_eq!(
            LinkSpec::parse("500kbit").unwrap().rate_bits_per_sec,
            Some(500_000)
        );
        assert_eq!(
            LinkSpec::parse("unlimited:30ms").unwrap().rtt,
            Duration::from_millis(30)
        );
    }

    #[test]
    fn named_profiles_stand_for_their_links() {
        assert_eq!(
            LinkSpec::parse("lan").unwrap(),
            LinkSpec::parse("unlimited").unwrap()
        );
        let dc = LinkSpec::parse("DC").unwrap();
        assert_eq!(dc.rate_bits_per_sec, Some(100_000_000));
        assert_eq!(dc.rtt, Duration::from_millis(20));
        let edge = LinkSpec::parse("edge").unwrap();
        assert_eq!(edge.label, "10mbit:100ms");
        assert_eq!(edge.profile().rate_bytes_per_sec, Some(1_250_000));
        assert!(LinkSpec::parse("edge:10ms").is_err());
    }

    #[test]
    fn jitter_and_loss_follow_the_round_trip_time() {
        let link = LinkSpec::parse("10mbit:100ms:20ms:1.5%").unwrap();
        assert_eq!(link.label, "10mbit:100ms:20ms:1.5%");
        assert_eq!(link.jitter, Duration::from_millis(20));
        assert!((link.loss - 0.015).abs() < 1e-12);
        let profile = link.profile();
        assert_eq!(profile.jitter, Duration::from_millis(20));
        assert!((profile.loss - 0.015).abs() < 1e-12);
        let loss_only = LinkSpec::parse("dc:x").err();
        assert!(loss_only.is_some());
        let loss_only = LinkSpec::parse("100mbit:20ms:2%").unwrap();
        assert_eq!(loss_only.jitter, Duration::ZERO);
        assert!((loss_only.loss - 0.02).abs() < 1e-12);
        for bad in ["10mbit:100ms:20", "10mbit:100ms:60%", "10mbit:100ms:9s"] {
            let err = LinkSpec::parse(bad).unwrap_err().to_string();
            assert!(err.contains("20mbit:50ms"), "{bad}: {err}");
        }
    }

    #[test]
    fn rejects_bad_links_with_the_expected_form() {
        for bad in [
            "",
            "fast",
            "20mb:50ms",
            "20mbit:50",
            "-3mbit",
            "0mbit",
            "10mbit:60s",
        ] {
            let err = LinkSpec::parse(bad).unwrap_err().to_string();
            assert!(err.contains("20mbit:50ms"), "{bad}: {err}");
        }
    }
}
