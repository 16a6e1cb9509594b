//! The key/value cache of one sequence.
//!
//! On the device, each layer keeps keys and values as
//! `[kv_heads, capacity, head_dim]` tensors; capacity grows in chunks so
//! appending a token is a slice write, not a reallocation. With the packed
//! (CPU) weight layout the transformer attends on the host instead, and
//! each layer keeps `[positions, kv_heads, head_dim]` in host vectors
//! ([`HostLayer`]).

use burn::prelude::*;

/// Capacity is allocated in multiples of this many positions.
const CHUNK: usize = 128;

/// Keys and values of one layer.
#[derive(Debug, Clone)]
struct LayerCache<B: Backend> {
    keys: Tensor<B, 3>,
    values: Tensor<B, 3>,
}

/// Keys and values of one layer in host memory, each
/// `[positions, kv_heads, head_dim]` row-major.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostLayer {
    pub(crate) keys: Vec<f32>,
    pub(crate) values: Vec<f32>,
}

#[derive(Debug)]
enum Storage<B: Backend> {
    Device(Vec<Option<LayerCache<B>>>),
    Host(Vec<HostLayer>),
}

/// The cache of one sequence across all layers.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    storage: Storage<B>,
    /// Positions already stored (identical for every layer between forwards).
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache on the device for a model with the given shape.
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self::with_storage(Storage::Device(vec![None; layers]), kv_heads, head_dim)
    }

    /// An empty cache in host memory, for the transformer's host attention.
    pub(crate) fn new_host(layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self::with_storage(
            Storage::Host(vec![HostLayer::default(); layers]),
            kv_heads,
            head_dim,
        )
    }

    fn with_storage(storage: Storage<B>, kv_heads: usize, head_dim: usize) -> Self {
        Self {
            storage,
            len: 0,
            capacity: 0,
            kv_heads,
            head_dim,
        }
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of f32 reserved by this cache (for the KV budget).
    pub fn reserved_bytes(&self) -> usize {
        let layers = match &self.storage {
            Storage::Device(layers) => layers.len(),
            Storage::Host(layers) => layers.len(),
        };
        bytes_for(layers, self.kv_heads, self.head_dim, self.capacity)
    }

    /// Appends `new` positions of keys and values for `layer` and returns
    /// every stored position (old and new) for attention.
    ///
    /// # Shapes
    /// - `keys`, `values`: `[kv_heads, new, head_dim]`
    /// - returns two tensors `[kv_heads, len + new, head_dim]`
    pub fn append(
        &mut self,
        layer: usize,
        keys: Tensor<B, 3>,
        values: Tensor<B, 3>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let new = keys.dims()[1];
        let end = self.len + new;
        let on = (&keys.device(), keys.dtype());
        let (kv, hd) = (self.kv_heads, self.head_dim);
        let cap = self.capacity.max(end.div_ceil(CHUNK) * CHUNK);
        let Storage::Device(layers) = &mut self.storage else {
            unreachable!("a host cache is only used by the host attention");
        };
        let slot = layers[layer].take();
        let mut lc = match slot {
            Some(lc) if lc.keys.dims()[1] >= end => lc,
            old => {
                let mut lc = LayerCache {
                    keys: Tensor::zeros([kv, cap, hd], on),
                    values: Tensor::zeros([kv, cap, hd], on),
                };
                if let Some(old) = old {
                    let n = self.len;
                    lc.keys = lc
                        .keys
                        .slice_assign([0..kv, 0..n, 0..hd], old.keys.slice([0..kv, 0..n, 0..hd]));
                    lc.values = lc
                        .values
                        .slice_assign([0..kv, 0..n, 0..hd], old.values.slice([0..kv, 0..n, 0..hd]));
                }
                lc
            }
        };
        lc.keys = lc.keys.slice_assign([0..kv, self.len..end, 0..hd], keys);
        lc.values = lc
            .values
            .slice_assign([0..kv, self.len..end, 0..hd], values);
        let out = (
            lc.keys.clone().slice([0..kv, 0..end, 0..hd]),
            lc.values.clone().slice([0..kv, 0..end, 0..hd]),
        );
        layers[layer] = Some(lc);
        out
    }

    /// Layer `layer`'s host keys and values; `None` for a device cache.
    /// The caller appends new positions; [`KvCache::advance`] counts them.
    pub(crate) fn host_layer(&mut self, layer: usize) -> Option<&mut HostLayer> {
        match &mut self.storage {
            Storage::Host(layers) => layers.get_mut(layer),
            Storage::Device(_) => None,
        }
    }

    /// A copy of the first `len` positions (at most those stored): a
    /// cache another sequence that starts with the same tokens can go on
    /// from ([`crate::prefix`]).
    pub fn snapshot(&self, len: usize) -> Self {
        let len = len.min(self.len);
        let (kv, hd) = (self.kv_heads, self.head_dim);
        let storage = match &self.storage {
            Storage::Device(layers) => Storage::Device(
                layers
                    .iter()
                    .map(|lc| {
                        lc.as_ref().map(|lc| LayerCache {
                            keys: lc.keys.clone().slice([0..kv, 0..len, 0..hd]),
                            values: lc.values.clone().slice([0..kv, 0..len, 0..hd]),
                        })
                    })
                    .collect(),
            ),
            Storage::Host(layers) => Storage::Host(
                layers
                    .iter()
                    .map(|l| HostLayer {
                        keys: l.keys[..(len * kv * hd).min(l.keys.len())].to_vec(),
                        values: l.values[..(len * kv * hd).min(l.values.len())].to_vec(),
                    })
                    .collect(),
            ),
        };
        Self {
            storage,
            len,
            capacity: len,
            kv_heads: kv,
            head_dim: hd,
        }
    }

    /// Forgets every position from `len` on (keeps the memory of a device
    /// cache; frees a host cache's).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let n = len * self.kv_heads * self.head_dim;
        if let Storage::Host(layers) = &mut self.storage {
            for l in layers {
                l.keys.truncate(n);
                l.keys.shrink_to_fit();
                l.values.truncate(n);
                l.values.shrink_to_fit();
            }
            self.capacity = len;
        }
        self.len = len;
    }

    /// Records that every layer now holds `new` more positions. Called by
    /// the transformer once per forward pass, after the last layer.
    pub(crate) fn advance(&mut self, new: usize) {
        self.len += new;
        self.capacity = self.capacity.max(self.len.div_ceil(CHUNK) * CHUNK);
    }
}

/// Bytes of f32 keys and values that `positions` positions take.
pub fn bytes_for(layers: usize, kv_heads: usize, head_dim: usize, positions: usize) -> usize {
    2 * layers * kv_heads * head_dim * positions * std::mem::size_of::<f32>()
}
