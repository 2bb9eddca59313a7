//! Retry policy: exponential backoff with full jitter, `Retry-After`, and the classification of
//! HTTP statuses and transport errors into [`RegistryError`]s that are or are not worth retrying.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use super::{ClientConfig, RegistryError};

/// One failed attempt: the classified error and whether (and when) to try again.
#[derive(Debug)]
pub(crate) struct Failure {
    pub error: RegistryError,
    pub retry: Retry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Do not retry: the answer will not change.
    Never,
    /// Retry after the usual backoff.
    Backoff,
    /// Retry no sooner than this (429/503 `Retry-After`).
    After(Duration),
}

impl Failure {
    pub fn fatal(error: RegistryError) -> Self {
        Self {
            error,
            retry: Retry::Never,
        }
    }
    pub fn transient(error: RegistryError) -> Self {
        Self {
            error,
            retry: Retry::Backoff,
        }
    }
}

impl From<RegistryError> for Failure {
    fn from(error: RegistryError) -> Self {
        let retry = if error.is_transient() {
            Retry::Backoff
        } else {
            Retry::Never
        };
        Self { error, retry }
    }
}

/// Classifies a transport error from reqwest (never includes headers, so no secrets).
pub(crate) fn transport_failure(context: &str, error: &reqwest::Error) -> Failure {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else if error.is_body() || error.is_decode() {
        "response body broken off"
    } else {
        "request failed"
    };
    // reqwest's Display includes the URL; URLs here never carry credentials (tokens go in
    // headers), but redirect targets may carry signed query strings, so print the chain only.
    let mut detail = String::new();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(error);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    Failure::transient(RegistryError::Unavailable(format!(
        "{context}: {kind}{detail}"
    )))
}

/// Classifies a non-success status. `headers` supply `Retry-After`.
pub(crate) fn status_failure(
    context: &str,
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
) -> Failure {
    let code = status.as_u16();
    let message = format!("{context}: HTTP {status}");
    match code {
        401 | 403 => Failure::fatal(RegistryError::Auth(format!(
            "{message} (check the credentials in the docker config or credential helper)"
        ))),
        404 => Failure::fatal(RegistryError::NotFound(message)),
        408 | 429 | 500..=599 => {
            let retry = match retry_after(headers) {
                Some(delay) => Retry::After(delay),
                None => Retry::Backoff,
            };
            Failure {
                error: RegistryError::Unavailable(message),
                retry,
            }
        }
        _ => Failure::fatal(RegistryError::Invalid(message)),
    }
}

/// Parses `Retry-After` as delta-seconds or an HTTP date.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(3600)));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Backoff schedule for one logical operation, bounded by a deadline.
pub(crate) struct Backoff {
    attempt: u32,
    max_retries: u32,
    initial: Duration,
    max: Duration,
    pub deadline: Instant,
}

impl Backoff {
    pub fn new(config: &ClientConfig) -> Self {
        Self {
            attempt: 0,
            max_retries: config.max_retries,
            initial: config.initial_backoff,
            max: config.max_backoff,
            deadline: Instant::now() + config.read_deadline,
        }
    }

    /// Time left before the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Waits before the next attempt, or returns the failure's error if it must not be retried,
    /// retries are used up, or the wait would pass the deadline.
    pub async fn wait(&mut self, failure: Failure) -> Result<(), RegistryError> {
        let delay = match failure.retry {
            Retry::Never => return Err(failure.error),
            Retry::Backoff => self.jittered(),
            Retry::After(d) => d.max(self.jittered()),
        };
        if self.attempt >= self.max_retries {
            return Err(with_note(
                failure.error,
                &format!("gave up after {} attempts", self.attempt + 1),
            ));
        }
        if delay >= self.remaining() {
            return Err(with_note(
                failure.error,
                &format!(
                    "gave up after {} attempts: the next retry would pass the read deadline",
                    self.attempt + 1
                ),
            ));
        }
        self.attempt += 1;
        tracing::debug!(attempt = self.attempt, ?delay, error = %failure.error, "registry retry");
        tokio::time::sleep(delay).await;
        Ok(())
    }

    fn jittered(&self) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        // Full jitter between half and the whole delay keeps retries spread without collapsing
        // to zero.
        let millis = u64::try_from(exp.as_millis()).unwrap_or(u64::MAX).max(1);
        let jitter = rand::random_range(millis / 2..=millis);
        Duration::from_millis(jitter)
    }
}

/// Appends `note` to the error's message, keeping its class.
pub(crate) fn with_note(error: RegistryError, note: &str) -> RegistryError {
    match error {
        RegistryError::Auth(m) => RegistryError::Auth(format!("{m} ({note})")),
        RegistryError::NotFound(m) => RegistryError::NotFound(format!("{m} ({note})")),
        RegistryError::Unavailable(m) => RegistryError::Unavailable(format!("{m} ({note})")),
        RegistryError::Corrupt(m) => RegistryError::Corrupt(format!("{m} ({note})")),
        RegistryError::Invalid(m) => RegistryError::Invalid(format!("{m} ({note})")),
        RegistryError::Config(m) => RegistryError::Config(format!("{m} ({note})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    #[test]
    fn classifies_statuses() {
        let h = HeaderMap::new();
        let f = status_failure("x", StatusCode::NOT_FOUND, &h);
        assert!(matches!(f.error, RegistryError::NotFound(_)));
        assert_eq!(f.retry, Retry::Never);
        let f = status_failure("x", StatusCode::BAD_GATEWAY, &h);
        assert!(matches!(f.error, RegistryError::Unavailable(_)));
        assert_eq!(f.retry, Retry::Backoff);
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        let f = status_failure("x", StatusCode::TOO_MANY_REQUESTS, &h);
        assert_eq!(f.retry, Retry::After(Duration::from_secs(2)));
        let f = status_failure("x", StatusCode::UNAUTHORIZED, &HeaderMap::new());
        assert!(matches!(f.error, RegistryError::Auth(_)));
    }

    #[tokio::test]
    async fn backoff_stops_at_max_retries_and_deadline() {
        let config = ClientConfig {
            max_retries: 2,
            initial_backoff: Duration::from_millis(1),
            read_deadline: Duration::from_secs(5),
            ..ClientConfig::default()
        };
        let mut b = Backoff::new(&config);
        let t = || Failure::transient(RegistryError::Unavailable("down".into()));
        assert!(b.wait(t()).await.is_ok());
        assert!(b.wait(t()).await.is_ok());
        assert!(matches!(
            b.wait(t()).await,
            Err(RegistryError::Unavailable(_))
        ));
        let mut b = Backoff::new(&config);
        let later = Failure {
            error: RegistryError::Unavailable("busy".into()),
            retry: Retry::After(Duration::from_secs(60)),
        };
        assert!(b.wait(later).await.is_err());
    }
}
