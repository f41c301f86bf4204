//! The prefix cache: the KV caches of recent requests, so that a request whose
//! prompt starts like an earlier one (an agent re-sending its system prompt and
//! the conversation so far) prefills only what is new.
//!
//! An entry is the exact token sequence a request fed to the model (its prompt,
//! then its reply but the last sampled token) with that sequence's KV, under the
//! key of the policy that computed it: an adapter changes every layer's keys and
//! values, so a prefix is reused only by a request of the same policy. A new
//! policy makes the old one's entries dead; they go at the next store.
//!
//! A lookup takes the entry with the longest common token prefix and copies that
//! many positions (a hit never consumes an entry, so concurrent requests share
//! it). Entries are few (the budget holds a handful of long conversations), so a
//! linear scan is the whole index. A stored sequence that extends an entry
//! replaces it (a conversation's turns keep one entry, not one per turn), and the
//! least recently used entries are evicted to stay within the byte budget.

use std::sync::{Arc, Mutex};

use crate::model::KvCache;

/// Prompt tokens a hit always leaves to prefill: the last one's logits start
/// the reply.
pub const MIN_PREFILL: usize = 1;

/// A reused prefix: its KV (a private copy) and how many prompt tokens it covers.
pub struct Hit {
    pub cache: KvCache,
    pub tokens: usize,
}

/// What a store did, for /metrics.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stored {
    /// Entries evicted for room, or dropped because their policy no longer serves.
    pub evicted: usize,
}

struct Entry {
    policy: u64,
    tokens: Vec<u32>,
    cache: Arc<KvCache>,
    bytes: usize,
    last_used: u64,
}

#[derive(Default)]
struct Inner {
    entries: Vec<Entry>,
    bytes: usize,
    /// Logical clock for LRU order.
    clock: u64,
}

pub struct PrefixCache {
    budget: usize,
    inner: Mutex<Inner>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// A cache holding at most `budget` bytes of KV; 0 disables it.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The longest cached prefix of `prompt` computed by `policy`, leaving at
    /// least the prompt's last [`MIN_PREFILL`] tokens to prefill.
    pub fn lookup(&self, policy: u64, prompt: &[u32]) -> Option<Hit> {
        let usable = prompt.len().saturating_sub(MIN_PREFILL);
        let (cache, tokens) = {
            let mut inner = self.lock();
            inner.clock += 1;
            let now = inner.clock;
            let best = inner
                .entries
                .iter_mut()
                .filter(|e| e.policy == policy)
                .map(|e| (common_prefix(&e.tokens, prompt).min(usable), e))
                .filter(|(n, _)| *n > 0)
                .max_by_key(|(n, e)| (*n, e.last_used))?;
            let (n, entry) = best;
            entry.last_used = now;
            (entry.cache.clone(), n)
        };
        // The copy runs outside the lock: other requests look up meanwhile.
        Some(Hit {
            cache: cache.prefix(tokens),
            tokens,
        })
    }

    /// Keeps `cache`, the KV of `tokens` (exactly its positions) under `policy`.
    /// `live` is the policy serving new requests now: entries of any other are
    /// dropped (and a request that finished on an older one stores nothing).
    pub fn store(
        &self,
        live: u64,
        policy: u64,
        mut tokens: Vec<u32>,
        mut cache: KvCache,
    ) -> Stored {
        let mut stored = Stored::default();
        if !self.enabled() {
            return stored;
        }
        let n = tokens.len().min(cache.len());
        tokens.truncate(n);
        cache.truncate(n);
        let mut inner = self.lock();
        let before = inner.entries.len();
        inner.entries.retain(|e| e.policy == live);
        stored.evicted += before - inner.entries.len();
        if policy != live || tokens.is_empty() {
            inner.bytes = inner.entries.iter().map(|e| e.bytes).sum();
            return stored;
        }
        inner.clock += 1;
        let now = inner.clock;
        // Already covered by an entry that extends it: only refresh that one.
        if let Some(e) = inner
            .entries
            .iter_mut()
            .find(|e| e.tokens.len() >= tokens.len() && e.tokens.starts_with(&tokens))
        {
            e.last_used = now;
            inner.bytes = inner.entries.iter().map(|e| e.bytes).sum();
            return stored;
        }
        cache.shrink_to_fit();
        let bytes = cache.bytes();
        if bytes > self.budget {
            inner.bytes = inner.entries.iter().map(|e| e.bytes).sum();
            return stored;
        }
        // Entries this one extends (the same conversation's earlier turns).
        inner.entries.retain(|e| !tokens.starts_with(&e.tokens));
        inner.bytes = inner.entries.iter().map(|e| e.bytes).sum();
        while inner.bytes + bytes > self.budget {
            let Some(oldest) = (0..inner.entries.len()).min_by_key(|&i| inner.entries[i].last_used)
            else {
                break;
            };
            let gone = inner.entries.swap_remove(oldest);
            inner.bytes -= gone.bytes;
            stored.evicted += 1;
        }
        inner.entries.push(Entry {
            policy,
            tokens,
            cache: Arc::new(cache),
            bytes,
            last_used: now,
        });
        inner.bytes += bytes;
        stored
    }

    /// Bytes of KV held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    pub fn entries(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{write_tiny_gguf, TinySpec};
    use crate::model::Model;
    use candle_core::Tensor;
    use std::sync::OnceLock;

    fn model() -> &'static Model {
        static MODEL: OnceLock<Model> = OnceLock::new();
        MODEL.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tiny.gguf");
            write_tiny_gguf(&path, &TinySpec::default()).unwrap();
            Model::load(&path).unwrap()
        })
    }

    fn kv(tokens: &[u32]) -> KvCache {
        let decoder = &model().decoder;
        let mut cache = KvCache::new();
        let ids = Tensor::new(tokens, decoder.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        decoder.forward_last(&ids, &mut cache).unwrap();
        cache
    }

    fn ids(range: std::ops::Range<u32>) -> Vec<u32> {
        range.map(|i| 3 + i % 250).collect()
    }

    /// Sequence `i` of `len` tokens: distinct first tokens for `i < 250`.
    fn distinct(i: u32, len: u32) -> Vec<u32> {
        (0..len).map(|j| 3 + (i * 169 + j * 31) % 250).collect()
    }

    #[test]
    fn longest_prefix_wins_and_leaves_a_token_to_prefill() {
        let cache = PrefixCache::new(1 << 20);
        assert!(cache.lookup(0, &ids(0..10)).is_none());
        cache.store(0, 0, ids(0..20), kv(&ids(0..20)));
        let mut other = ids(0..5);
        other.extend(ids(100..120));
        cache.store(0, 0, other.clone(), kv(&other));
        assert_eq!(cache.entries(), 2);

        let mut prompt = ids(0..12);
        prompt.extend(ids(200..210));
        let hit = cache.lookup(0, &prompt).unwrap();
        assert_eq!((hit.tokens, hit.cache.len()), (12, 12));
        // The very prompt stored, or one inside an entry: all but the last token.
        let hit = cache.lookup(0, &ids(0..20)).unwrap();
        assert_eq!(hit.tokens, 19);
        assert_eq!(cache.lookup(0, &ids(0..8)).unwrap().tokens, 7);
        // Nothing in common (or a one-token prompt): no hit.
        assert!(cache.lookup(0, &ids(50..60)).is_none());
        assert!(cache.lookup(0, &ids(0..1)).is_none());
        assert_eq!(cache.lookup(0, &ids(0..2)).unwrap().tokens, 1);
    }

    #[test]
    fn a_conversation_keeps_one_entry() {
        let cache = PrefixCache::new(1 << 20);
        cache.store(0, 0, ids(0..10), kv(&ids(0..10)));
        cache.store(0, 0, ids(0..30), kv(&ids(0..30)));
        assert_eq!(cache.entries(), 1, "turn 2 replaces turn 1");
        let bytes = cache.bytes();
        cache.store(0, 0, ids(0..15), kv(&ids(0..15)));
        assert_eq!(cache.entries(), 1, "a prefix of an entry adds nothing");
        assert_eq!(cache.bytes(), bytes);
        assert_eq!(cache.lookup(0, &ids(0..40)).unwrap().tokens, 30);
    }

    /// A prefix computed under one policy never serves another, and a new
    /// policy's first store drops the old one's entries.
    #[test]
    fn entries_are_per_policy() {
        let cache = PrefixCache::new(1 << 20);
        cache.store(0, 0, ids(0..20), kv(&ids(0..20)));
        assert!(cache.lookup(7, &ids(0..20)).is_none());
        assert_eq!(cache.lookup(0, &ids(0..20)).unwrap().tokens, 19);
        // Policy 7 serves now; a request that ran on 0 finishes after the swap.
        let stored = cache.store(7, 0, ids(0..25), kv(&ids(0..25)));
        assert_eq!(stored.evicted, 1);
        assert_eq!(cache.entries(), 0);
        assert!(cache.lookup(0, &ids(0..20)).is_none());
        cache.store(7, 7, ids(0..20), kv(&ids(0..20)));
        assert!(cache.lookup(0, &ids(0..20)).is_none());
        assert_eq!(cache.lookup(7, &ids(0..20)).unwrap().tokens, 19);
    }

    /// Many stores never hold more than the budget; the least recently used go
    /// first, and an entry larger than the whole budget is not kept.
    #[test]
    fn memory_stays_under_the_budget() {
        let per_token = kv(&ids(0..10)).bytes() / 10;
        let budget = 200 * per_token;
        let cache = PrefixCache::new(budget);
        let first = distinct(0, 20);
        cache.store(0, 0, first.clone(), kv(&first));
        let mut evicted = 0;
        for i in 1..60u32 {
            let seq = distinct(i, 20 + (i * 7) % 40);
            evicted += cache.store(0, 0, seq.clone(), kv(&seq)).evicted;
            assert!(cache.bytes() <= budget, "{} > {budget}", cache.bytes());
            assert!(cache.lookup(0, &seq).is_some(), "store {i} was kept");
            // Keep the first sequence in use: LRU must not evict it.
            assert_eq!(cache.lookup(0, &first).map(|h| h.tokens), Some(19));
        }
        assert!(evicted > 40, "{evicted}");
        assert!(cache.entries() >= 3);
        // Larger than the budget: not kept, and the entry it extends stays.
        let mut huge = first.clone();
        huge.extend(distinct(99, 200));
        cache.store(0, 0, huge.clone(), kv(&huge));
        assert!(cache.bytes() <= budget);
        assert_eq!(cache.lookup(0, &huge).unwrap().tokens, 20);

        let off = PrefixCache::new(0);
        off.store(0, 0, ids(0..20), kv(&ids(0..20)));
        assert_eq!((off.entries(), off.bytes()), (0, 0));
        assert!(off.lookup(0, &ids(0..20)).is_none());
    }
}
