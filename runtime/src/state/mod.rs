//! Keyed state as operators see it: typed handles (`ValueState`, `ListState`, `MapState`,
//! `ReducingState`) that read and write the state of the record's key through a
//! [`KeyedContext`]. The handles know nothing of the backend's layout.

mod memory;

pub use memory::{KeyedBackend, KeyedSnapshot};

use crate::keygroup::KeyGroup;
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;

/// What a key must be: serializable (its bytes choose the key group), hashable, cloneable.
pub trait Key: Serialize + DeserializeOwned + Hash + Eq + Clone + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Hash + Eq + Clone + Send + Sync + 'static> Key for T {}

/// What a state value must be.
pub trait StateValue: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> StateValue for T {}

/// The record's key and key group, and the backend, while a keyed function runs.
pub struct KeyedContext<'a, K> {
    pub(crate) key: &'a K,
    pub(crate) key_group: KeyGroup,
    pub(crate) kg_index: usize,
    pub(crate) backend: &'a mut KeyedBackend,
}

impl<K> KeyedContext<'_, K> {
    /// The key of the record being processed.
    pub fn key(&self) -> &K {
        self.key
    }

    /// Its key group.
    pub fn key_group(&self) -> KeyGroup {
        self.key_group
    }
}

/// Zero-sized type marker for state handles (keeps handles `Send + Sync` whatever the types).
type Marker<T> = PhantomData<fn() -> T>;

/// Folds two values into one, for [`ReducingState`].
pub type ReduceFn<V> = Arc<dyn Fn(&V, &V) -> V + Send + Sync>;

/// A single value per key.
pub struct ValueState<K, V> {
    id: usize,
    _t: Marker<(K, V)>,
}

/// A list of values per key.
pub struct ListState<K, V> {
    id: usize,
    _t: Marker<(K, V)>,
}

/// A map per key.
pub struct MapState<K, UK, UV> {
    id: usize,
    _t: Marker<(K, UK, UV)>,
}

/// A value per key that folds every added value with a reduce function.
pub struct ReducingState<K, V> {
    id: usize,
    reduce: ReduceFn<V>,
    _t: Marker<K>,
}

macro_rules! handle_clone {
    ($t:ident < $($p:ident),* >) => {
        impl<$($p),*> Clone for $t<$($p),*> {
            fn clone(&self) -> Self {
                Self { id: self.id, _t: PhantomData }
            }
        }
    };
}
handle_clone!(ValueState<K, V>);
handle_clone!(ListState<K, V>);
handle_clone!(MapState<K, UK, UV>);

impl<K, V> Clone for ReducingState<K, V> {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            reduce: self.reduce.clone(),
            _t: PhantomData,
        }
    }
}

/// Stored form of value, list and reducing state.
#[derive(Clone)]
pub(crate) struct Single<V>(pub V);

/// Stored form of map state.
#[derive(Clone)]
pub(crate) struct MapEntries<UK, UV>(pub FxHashMap<UK, UV>);

impl<K: Key, V: StateValue> ValueState<K, V> {
    pub(crate) fn new(id: usize) -> Self {
        Self {
            id,
            _t: PhantomData,
        }
    }

    /// The value of the current key.
    pub fn get<'c>(&self, ctx: &'c KeyedContext<'_, K>) -> Option<&'c V> {
        ctx.backend
            .get::<K, Single<V>>(self.id, ctx.kg_index, ctx.key)
            .map(|s| &s.0)
    }

    /// Sets the value of the current key.
    pub fn update(&self, ctx: &mut KeyedContext<'_, K>, value: V) {
        let (idx, key) = (ctx.kg_index, ctx.key);
        match ctx.backend.get_mut::<K, Single<V>>(self.id, idx, key) {
            Some(slot) => slot.0 = value,
            None => ctx.backend.insert(self.id, idx, key.clone(), Single(value)),
        }
    }

    /// Changes the value of the current key in place, starting from `default` when absent.
    pub fn update_with(
        &self,
        ctx: &mut KeyedContext<'_, K>,
        default: impl FnOnce() -> V,
        f: impl FnOnce(&mut V),
    ) {
        let (idx, key) = (ctx.kg_index, ctx.key);
        match ctx.backend.get_mut::<K, Single<V>>(self.id, idx, key) {
            Some(slot) => f(&mut slot.0),
            None => {
                let mut v = default();
                f(&mut v);
                ctx.backend.insert(self.id, idx, key.clone(), Single(v));
            }
        }
    }

    /// Removes the value of the current key.
    pub fn clear(&self, ctx: &mut KeyedContext<'_, K>) {
        ctx.backend
            .remove::<K, Single<V>>(self.id, ctx.kg_index, ctx.key);
    }

    /// Every (key, value) of this subtask, e.g. to emit results at the end of input.
    pub fn entries<'b>(
        &self,
        backend: &'b KeyedBackend,
    ) -> impl Iterator<Item = (&'b K, &'b V)> + 'b {
        backend
            .iter::<K, Single<V>>(self.id)
            .map(|(k, v)| (k, &v.0))
    }
}

impl<K: Key, V: StateValue> ListState<K, V> {
    pub(crate) fn new(id: usize) -> Self {
        Self {
            id,
            _t: PhantomData,
        }
    }

    /// The list of the current key (empty when absent).
    pub fn get<'c>(&self, ctx: &'c KeyedContext<'_, K>) -> &'c [V] {
        ctx.backend
            .get::<K, Single<Vec<V>>>(self.id, ctx.kg_index, ctx.key)
            .map(|s| s.0.as_slice())
            .unwrap_or(&[])
    }

    /// Appends to the list of the current key.
    pub fn add(&self, ctx: &mut KeyedContext<'_, K>, value: V) {
        let (idx, key) = (ctx.kg_index, ctx.key);
        match ctx.backend.get_mut::<K, Single<Vec<V>>>(self.id, idx, key) {
            Some(slot) => slot.0.push(value),
            None => ctx
                .backend
                .insert(self.id, idx, key.clone(), Single(vec![value])),
        }
    }

    /// Replaces the list of the current key.
    pub fn update(&self, ctx: &mut KeyedContext<'_, K>, values: Vec<V>) {
        if values.is_empty() {
            return self.clear(ctx);
        }
        ctx.backend
            .insert(self.id, ctx.kg_index, ctx.key.clone(), Single(values));
    }

    /// Removes the list of the current key.
    pub fn clear(&self, ctx: &mut KeyedContext<'_, K>) {
        ctx.backend
            .remove::<K, Single<Vec<V>>>(self.id, ctx.kg_index, ctx.key);
    }

    /// Every (key, list) of this subtask.
    pub fn entries<'b>(
        &self,
        backend: &'b KeyedBackend,
    ) -> impl Iterator<Item = (&'b K, &'b [V])> + 'b {
        backend
            .iter::<K, Single<Vec<V>>>(self.id)
            .map(|(k, v)| (k, v.0.as_slice()))
    }
}

impl<K: Key, UK: Key, UV: StateValue> MapState<K, UK, UV> {
    pub(crate) fn new(id: usize) -> Self {
        Self {
            id,
            _t: PhantomData,
        }
    }

    /// The value under `user_key` for the current key.
    pub fn get<'c>(&self, ctx: &'c KeyedContext<'_, K>, user_key: &UK) -> Option<&'c UV> {
        ctx.backend
            .get::<K, MapEntries<UK, UV>>(self.id, ctx.kg_index, ctx.key)
            .and_then(|m| m.0.get(user_key))
    }

    /// Puts `user_key -> value` for the current key.
    pub fn put(&self, ctx: &mut KeyedContext<'_, K>, user_key: UK, value: UV) {
        let (idx, key) = (ctx.kg_index, ctx.key);
        match ctx
            .backend
            .get_mut::<K, MapEntries<UK, UV>>(self.id, idx, key)
        {
            Some(m) => {
                m.0.insert(user_key, value);
            }
            None => {
                let mut m = FxHashMap::default();
                m.insert(user_key, value);
                ctx.backend.insert(self.id, idx, key.clone(), MapEntries(m));
            }
        }
    }

    /// Removes `user_key` for the current key.
    pub fn remove(&self, ctx: &mut KeyedContext<'_, K>, user_key: &UK) {
        let (idx, key) = (ctx.kg_index, ctx.key);
        let now_empty = match ctx
            .backend
            .get_mut::<K, MapEntries<UK, UV>>(self.id, idx, key)
        {
            Some(m) => {
                m.0.remove(user_key);
                m.0.is_empty()
            }
            None => false,
        };
        if now_empty {
            ctx.backend
                .remove::<K, MapEntries<UK, UV>>(self.id, idx, key);
        }
    }

    /// The current key's entries, in no particular order.
    pub fn iter<'c>(
        &self,
        ctx: &'c KeyedContext<'_, K>,
    ) -> impl Iterator<Item = (&'c UK, &'c UV)> + 'c {
        ctx.backend
            .get::<K, MapEntries<UK, UV>>(self.id, ctx.kg_index, ctx.key)
            .into_iter()
            .flat_map(|m| m.0.iter())
    }

    /// Removes the whole map of the current key.
    pub fn clear(&self, ctx: &mut KeyedContext<'_, K>) {
        ctx.backend
            .remove::<K, MapEntries<UK, UV>>(self.id, ctx.kg_index, ctx.key);
    }
}

impl<K: Key, V: StateValue> ReducingState<K, V> {
    pub(crate) fn new(id: usize, reduce: ReduceFn<V>) -> Self {
        Self {
            id,
            reduce,
            _t: PhantomData,
        }
    }

    /// The reduced value of the current key.
    pub fn get<'c>(&self, ctx: &'c KeyedContext<'_, K>) -> Option<&'c V> {
        ctx.backend
            .get::<K, Single<V>>(self.id, ctx.kg_index, ctx.key)
            .map(|s| &s.0)
    }

    /// Folds `value` into the current key's value.
    pub fn add(&self, ctx: &mut KeyedContext<'_, K>, value: V) {
        let (idx, key) = (ctx.kg_index, ctx.key);
        match ctx.backend.get_mut::<K, Single<V>>(self.id, idx, key) {
            Some(slot) => slot.0 = (self.reduce)(&slot.0, &value),
            None => ctx.backend.insert(self.id, idx, key.clone(), Single(value)),
        }
    }

    /// Removes the current key's value.
    pub fn clear(&self, ctx: &mut KeyedContext<'_, K>) {
        ctx.backend
            .remove::<K, Single<V>>(self.id, ctx.kg_index, ctx.key);
    }

    /// Every (key, value) of this subtask.
    pub fn entries<'b>(
        &self,
        backend: &'b KeyedBackend,
    ) -> impl Iterator<Item = (&'b K, &'b V)> + 'b {
        backend
            .iter::<K, Single<V>>(self.id)
            .map(|(k, v)| (k, &v.0))
    }
}
