//! The prefix cache: keys and values of finished sequences, kept so that a
//! request starting with the same tokens (a system prompt, a conversation's
//! earlier turns) reads them instead of computing them again.
//!
//! Each entry is the KV cache of one finished sequence's prompt with its
//! tokens. A new request takes the entry sharing the longest prefix with
//! its prompt, copies that many positions and prefills only the rest; it
//! computes at least its last prompt token, whose logits it needs, unless
//! an entry kept those logits too (below).
//! The entries together stay within a byte budget, the least recently used
//! leaving first; an entry whose tokens begin another's is dropped as
//! redundant.
//!
//! A whole prompt is also kept with the logits after its last token (when
//! its sequence had them from a plain prefill): a request with exactly
//! that prompt (a retry, a later choice of one request) copies all of it
//! and samples from that row, computing nothing ([`PrefixCache::fork`]).
//! Such an entry is not dropped when a longer one extends it.
//!
//! Sequences still running share the same way: a request starting like
//! one in the batch copies the whole prefill chunks that sequence has
//! already computed of its prompt (the scheduler picks whichever holds
//! more, a running sequence or a cache entry; see
//! [`PrefixCache::shared_len`] and [`reusable_len`]).
//!
//! A request served from the cache gets the answer it would get without
//! it, bit for bit: only positions its own prefill would have computed in
//! the same forward passes are copied. Prefill runs in chunks of
//! `prefill_chunk` tokens from position 0, and how many rows a pass has
//! picks the kernels (on the CPU, up to 4 rows multiply 8- and 16-bit
//! rounded activations, more rows f32), so the reusable part is the whole
//! chunks of a prompt: a shared prefix is cut down to a multiple of the
//! chunk, and the positions an answer added (computed one at a time) are
//! not kept.

use std::sync::Arc;

use burn::prelude::*;

use crate::cache::KvCache;

/// Shortest prefix worth reusing, in tokens.
pub const MIN_PREFIX_TOKENS: usize = 16;
/// Most entries kept, whatever their size.
const MAX_ENTRIES: usize = 256;

struct Entry<B: Backend> {
    tokens: Vec<u32>,
    cache: KvCache<B>,
    /// The logits after the last of `tokens`, when they are a whole
    /// prompt: a request with exactly that prompt reads nothing again
    /// ([`PrefixCache::fork`]).
    row: Option<Arc<[f32]>>,
    bytes: usize,
    last_used: u64,
}

/// Finished sequences' caches, within `budget_bytes`.
pub(crate) struct PrefixCache<B: Backend> {
    entries: Vec<Entry<B>>,
    budget_bytes: usize,
    used_bytes: usize,
    clock: u64,
    bytes_per_token: usize,
    /// Prefixes are reused in multiples of this (the prefill chunk).
    align: usize,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// How many positions of `prompt` can be read from a cache holding those
/// of `held`: their common prefix, short of `prompt`'s last token (whose
/// logits the request needs), cut down to whole chunks of `align`; 0 when
/// that is under [`MIN_PREFIX_TOKENS`].
pub(crate) fn reusable_len(held: &[u32], prompt: &[u32], align: usize) -> usize {
    let n = common_prefix(held, prompt).min(prompt.len().saturating_sub(1));
    let n = n - n % align.max(1);
    if n < MIN_PREFIX_TOKENS.max(1) {
        0
    } else {
        n
    }
}

impl<B: Backend> PrefixCache<B> {
    /// An empty cache; `bytes_per_token` is what one position costs,
    /// `align` the engine's prefill chunk.
    pub(crate) fn new(budget_bytes: usize, bytes_per_token: usize, align: usize) -> Self {
        Self {
            entries: Vec::new(),
            budget_bytes,
            used_bytes: 0,
            clock: 0,
            bytes_per_token: bytes_per_token.max(1),
            align: align.max(1),
        }
    }

    /// How many positions of `prompt` [`Self::lookup`] would give, without
    /// taking them (0 when under [`MIN_PREFIX_TOKENS`]).
    pub(crate) fn shared_len(&self, prompt: &[u32]) -> usize {
        self.entries
            .iter()
            .map(|e| reusable_len(&e.tokens, prompt, self.align))
            .max()
            .unwrap_or(0)
    }

    /// Bytes held.
    pub(crate) fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    /// A cache holding the longest known prefix of `prompt` (whole
    /// prefill chunks of it), and its length; `None` when less than
    /// [`MIN_PREFIX_TOKENS`] would come from the cache. The last prompt
    /// token is never taken from the cache.
    pub(crate) fn lookup(&mut self, prompt: &[u32]) -> Option<(KvCache<B>, usize)> {
        let (index, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, reusable_len(&e.tokens, prompt, self.align)))
            .max_by_key(|&(i, n)| (n, self.entries[i].last_used))?;
        if shared == 0 {
            return None;
        }
        self.clock += 1;
        let entry = &mut self.entries[index];
        entry.last_used = self.clock;
        Some((entry.cache.snapshot(shared), shared))
    }

    /// Whether [`Self::fork`] would find `prompt`.
    pub(crate) fn holds_whole(&self, prompt: &[u32]) -> bool {
        self.entries
            .iter()
            .any(|e| e.row.is_some() && e.tokens == prompt)
    }

    /// An entry holding exactly `prompt`, all of it, with the logits after
    /// it: a copy of its keys and values and that row, so a request with
    /// the same prompt (a retry, a later choice of one request) computes
    /// nothing of it.
    pub(crate) fn fork(&mut self, prompt: &[u32]) -> Option<(KvCache<B>, Arc<[f32]>)> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self
            .entries
            .iter_mut()
            .find(|e| e.row.is_some() && e.tokens == prompt)?;
        entry.last_used = clock;
        let row = Arc::clone(entry.row.as_ref()?);
        Some((entry.cache.snapshot(prompt.len()), row))
    }

    /// Keeps the whole prefill chunks of `cache`, which holds the first
    /// `cache.len()` of `prompt` (positions past the prompt, computed while
    /// answering, are dropped). With `row`, the logits after the whole
    /// prompt, every prompt position is kept with it, for [`Self::fork`].
    pub(crate) fn insert(
        &mut self,
        prompt: &[u32],
        mut cache: KvCache<B>,
        row: Option<Arc<[f32]>>,
    ) {
        let tokens = prompt;
        let row = row.filter(|_| cache.len() >= tokens.len());
        let len = cache.len().min(tokens.len());
        let len = if row.is_some() {
            len
        } else {
            len - len % self.align
        };
        if len < MIN_PREFIX_TOKENS || self.budget_bytes == 0 {
            return;
        }
        let tokens = &tokens[..len];
        self.clock += 1;
        // Already covered by a longer (or equal) entry: just mark it used.
        // Only an entry of this very prompt with its row covers one with a
        // row.
        if let Some(e) = self.entries.iter_mut().find(|e| {
            e.tokens.len() >= len
                && e.tokens[..len] == *tokens
                && (row.is_none() || (e.tokens.len() == len && e.row.is_some()))
        }) {
            e.last_used = self.clock;
            return;
        }
        cache.truncate(len);
        let bytes = len * self.bytes_per_token + row.as_ref().map_or(0, |r| r.len() * 4);
        if bytes > self.budget_bytes {
            return;
        }
        // Entries this one extends are redundant now, unless they hold a
        // whole prompt's row (an exact repeat of that prompt still reads
        // nothing).
        let mut freed = 0;
        self.entries.retain(|e| {
            let redundant = e.tokens.len() <= len
                && tokens[..e.tokens.len()] == *e.tokens
                && (e.row.is_none() || (e.tokens.len() == len && row.is_some()));
            if redundant {
                freed += e.bytes;
            }
            !redundant
        });
        self.used_bytes -= freed;
        while !self.entries.is_empty()
            && (self.used_bytes + bytes > self.budget_bytes || self.entries.len() >= MAX_ENTRIES)
        {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
                .unwrap_or(0);
            let e = self.entries.swap_remove(oldest);
            self.used_bytes -= e.bytes;
        }
        self.used_bytes += bytes;
        self.entries.push(Entry {
            tokens: tokens.to_vec(),
            cache,
            row,
            bytes,
            last_used: self.clock,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    fn cache_of(n: usize) -> KvCache<Cpu> {
        let mut c = KvCache::<Cpu>::new_host(2, 1, 4);
        for layer in 0..2 {
            if let Some(l) = c.host_layer(layer) {
                l.keys.extend((0..n * 4).map(|i| i as f32));
                l.values.extend((0..n * 4).map(|i| -(i as f32)));
            }
        }
        c.advance(n);
        c
    }

    fn tokens(n: u32) -> Vec<u32> {
        (0..n).collect()
    }

    #[test]
    fn the_longest_shared_prefix_is_reused_but_never_the_last_prompt_token() {
        let mut p = PrefixCache::<Cpu>::new(1 << 20, 64, 1);
        p.insert(&tokens(40), cache_of(40), None);
        // A prompt that goes on past the entry.
        let mut prompt = tokens(40);
        prompt.extend([1000, 1001]);
        let (c, n) = p.lookup(&prompt).expect("hit");
        assert_eq!((n, c.len()), (40, 40));
        // A prompt equal to the entry: its last token is computed again.
        let (_, n) = p.lookup(&tokens(40)).expect("hit");
        assert_eq!(n, 39);
        // Diverging at 20: 20 positions.
        let mut other = tokens(20);
        other.extend([7; 30]);
        let (mut c, n) = p.lookup(&other).expect("hit");
        assert_eq!(n, 20);
        let l = c.host_layer(1).expect("host");
        assert_eq!(l.keys.len(), 20 * 4);
        assert_eq!(l.values[79], -79.0);
        // Too little in common.
        let mut short = tokens(MIN_PREFIX_TOKENS as u32 - 1);
        short.extend([9; 40]);
        assert!(p.lookup(&short).is_none());
    }

    /// A whole prompt kept with the logits after it is forked from as a
    /// whole (nothing read again), where other prompts still share its
    /// whole chunks; an entry extending it leaves it in place.
    #[test]
    fn a_whole_prompt_with_its_row_is_forked_from_as_a_whole() {
        let mut p = PrefixCache::<Cpu>::new(1 << 20, 64, 8);
        let row: Arc<[f32]> = Arc::from(vec![0.5_f32; 10]);
        p.insert(&tokens(43), cache_of(43), Some(Arc::clone(&row)));
        assert_eq!(p.used_bytes(), 43 * 64 + 40, "every position and the row");
        let (c, got) = p.fork(&tokens(43)).expect("the same prompt");
        assert_eq!((c.len(), &got[..]), (43, &row[..]));
        assert!(p.fork(&tokens(42)).is_none(), "a shorter prompt has no row");
        let mut longer = tokens(43);
        longer.push(7);
        assert!(p.fork(&longer).is_none());
        assert_eq!(p.lookup(&longer).map(|(_, n)| n), Some(40), "whole chunks");
        // Without a row, the same prompt keeps whole chunks only.
        let mut q = PrefixCache::<Cpu>::new(1 << 20, 64, 8);
        q.insert(&tokens(43), cache_of(43), None);
        assert!(q.fork(&tokens(43)).is_none());
        // An extension does not make the whole prompt redundant.
        let mut next = tokens(43);
        next.extend(500..520);
        p.insert(&next, cache_of(63), None);
        assert!(p.fork(&tokens(43)).is_some());
    }

    #[test]
    fn prefixes_are_reused_in_whole_prefill_chunks() {
        let mut p = PrefixCache::<Cpu>::new(1 << 20, 64, 8);
        // 43 positions kept as 40: the last 3 came from a pass of 3 rows.
        p.insert(&tokens(43), cache_of(43), None);
        assert_eq!(p.used_bytes(), 40 * 64);
        let mut prompt = tokens(43);
        prompt.push(7);
        let (c, n) = p.lookup(&prompt).expect("hit");
        assert_eq!((n, c.len()), (40, 40));
        // 37 shared: 32 reused.
        let mut other = tokens(37);
        other.extend([900; 10]);
        assert_eq!(p.lookup(&other).map(|(_, n)| n), Some(32));
        // 15 shared is 8 after alignment: below the minimum.
        let mut short = tokens(15);
        short.extend([900; 10]);
        assert!(p.lookup(&short).is_none());
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used_and_extensions_replace_their_prefix() {
        let per_token = 100;
        let mut p = PrefixCache::<Cpu>::new(100 * per_token, per_token, 1);
        let a: Vec<u32> = (0..40).collect();
        let b: Vec<u32> = (1000..1040).collect();
        p.insert(&a, cache_of(40), None);
        p.insert(&b, cache_of(40), None);
        assert_eq!(p.used_bytes(), 80 * per_token);
        // `a` is used, so `b` is the one to go.
        let mut prompt = a.clone();
        prompt.push(5);
        assert!(p.lookup(&prompt).is_some());
        let c: Vec<u32> = (2000..2040).collect();
        p.insert(&c, cache_of(40), None);
        assert_eq!(p.used_bytes(), 80 * per_token);
        let mut prompt_b = b.clone();
        prompt_b.push(5);
        assert!(p.lookup(&prompt_b).is_none(), "b was evicted");
        assert!(p.lookup(&prompt).is_some(), "a stays");
        // `a` extended replaces `a`; `a` again is then already covered.
        let mut longer = a.clone();
        longer.extend(3000..3010);
        p.insert(&longer, cache_of(50), None);
        assert_eq!(p.used_bytes(), 90 * per_token);
        p.insert(&a, cache_of(40), None);
        assert_eq!(p.used_bytes(), 90 * per_token);
        // Larger than the whole budget: not kept.
        let huge: Vec<u32> = (5000..5200).collect();
        p.insert(&huge, cache_of(200), None);
        assert_eq!(p.used_bytes(), 90 * per_token);
    }
}
