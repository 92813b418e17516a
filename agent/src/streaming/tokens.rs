//! Single-use tokens for parked streaming requests, each valid for a fixed time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use rand::RngCore;

use super::{Request, StreamingError};

/// Most requests parked at once (kubelet's streaming cache holds as many).
pub const MAX_IN_FLIGHT: usize = 1000;

/// Parked requests by token.
pub struct TokenCache {
    ttl: Duration,
    map: Mutex<HashMap<String, (Request, Instant)>>,
}

impl TokenCache {
    /// A cache whose tokens live `ttl`.
    pub fn new(ttl: Duration) -> TokenCache {
        TokenCache {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Parks `req`; returns its token (128 random bits, URL-safe).
    pub fn insert(&self, req: Request) -> Result<String, StreamingError> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        map.retain(|_, (_, expires)| *expires > now);
        if map.len() >= MAX_IN_FLIGHT {
            return Err(StreamingError::TooMany(map.len()));
        }
        let mut raw = [0u8; 16];
        rand::rng().fill_bytes(&mut raw);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        map.insert(token.clone(), (req, now + self.ttl));
        Ok(token)
    }

    /// Takes a token's request: a token works once, and not after it expired.
    pub fn take(&self, token: &str) -> Option<Request> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (req, expires) = map.remove(token)?;
        (expires > Instant::now()).then_some(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> Request {
        Request::PortForward {
            sandbox_id: "p".into(),
            ports: vec![],
        }
    }

    #[test]
    fn a_token_works_once() {
        let c = TokenCache::new(Duration::from_secs(60));
        let t = c.insert(req()).unwrap();
        assert!(c.take(&t).is_some());
        assert!(c.take(&t).is_none());
        assert!(c.take("nope").is_none());
    }

    #[test]
    fn an_expired_token_is_refused() {
        let c = TokenCache::new(Duration::from_millis(1));
        let t = c.insert(req()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(c.take(&t).is_none());
    }
}
