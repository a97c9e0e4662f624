//! What the RocksDB backend needs from RocksDB's C API that rust-rocksdb does not wrap; the
//! only unsafe code in the workspace.
//! - Ingestion of another instance's own SST files, without reading or rewriting a key: how a
//!   restore at a new parallelism merges old instances whose key-group ranges do not overlap
//!   (Flink's "ingest DB" rescaling; `IngestExternalFileOptions::allow_db_generated_files`,
//!   RocksDB 9.x and later).
//! - No IDENTITY file at open, which shortens a restore.
#![allow(unsafe_code)]

use crate::keygroup::KeyGroupRange;
use crate::{Error, Result};
use librocksdb_sys as ffi;
use rocksdb::{AsColumnFamilyRef, AsRawPtr, Options, DB};
use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::path::{Path, PathBuf};

/// A live SST file of an instance, to ingest into another.
pub(super) struct LiveFile {
    pub(super) path: PathBuf,
    /// Likely written outside the instance and ingested into it (a checkpoint's SST file): its
    /// keys carry sequence number 0, and the one they were given lives in the instance's
    /// manifest only, the same for all of them (not 0, which the bottom level gives). A file
    /// the instance wrote itself can look the same (one key, or a compaction of one ingested
    /// file): ingesting it as external then fails, and the keys are copied instead.
    pub(super) external: bool,
    /// The key groups of its smallest and largest keys (`None`: a key too short to tell).
    pub(super) key_groups: Option<KeyGroupRange>,
}

/// The live SST files of `db` (opened from `dir`), per column family, each list in the order
/// ingestion needs: deeper levels first, and within a level older files first. RocksDB
/// requires that a key found in several ingested files is newest in the last one.
pub(super) fn files_for_ingestion(db: &DB, dir: &Path) -> Result<BTreeMap<String, Vec<LiveFile>>> {
    struct Live {
        level: i32,
        largest_seqno: u64,
        file: LiveFile,
    }
    let mut by_cf: BTreeMap<String, Vec<Live>> = BTreeMap::new();
    // SAFETY: `db` outlives the listing, which is destroyed below before returning; the
    // strings it hands out are copied before that.
    unsafe {
        let files = ffi::rocksdb_livefiles(db.as_raw_ptr());
        if files.is_null() {
            return Err(Error::User(format!(
                "rocksdb: cannot list the SST files of {}",
                dir.display()
            )));
        }
        for i in 0..ffi::rocksdb_livefiles_count(files) {
            let text = |p: *const c_char| CStr::from_ptr(p).to_string_lossy().into_owned();
            let cf = text(ffi::rocksdb_livefiles_column_family_name(files, i));
            let name = text(ffi::rocksdb_livefiles_name(files, i));
            let key_group = |p: *const c_char, len: usize| {
                if p.is_null() || len < 2 {
                    return None;
                }
                let key = std::slice::from_raw_parts(p.cast::<u8>(), 2);
                Some(u16::from_be_bytes([key[0], key[1]]))
            };
            let (mut small_len, mut large_len) = (0usize, 0usize);
            let smallest = ffi::rocksdb_livefiles_smallestkey(files, i, &mut small_len);
            let largest = ffi::rocksdb_livefiles_largestkey(files, i, &mut large_len);
            let key_groups = key_group(smallest, small_len)
                .zip(key_group(largest, large_len))
                .map(|(a, b)| KeyGroupRange::new(a, b));
            let largest_seqno = ffi::rocksdb_livefiles_largest_seqno(files, i);
            let smallest_seqno = ffi::rocksdb_livefiles_smallest_seqno(files, i);
            by_cf.entry(cf).or_default().push(Live {
                level: ffi::rocksdb_livefiles_level(files, i),
                largest_seqno,
                file: LiveFile {
                    path: dir.join(name.trim_start_matches('/')),
                    external: smallest_seqno == largest_seqno && largest_seqno > 0,
                    key_groups,
                },
            });
        }
        ffi::rocksdb_livefiles_destroy(files);
    }
    Ok(by_cf
        .into_iter()
        .map(|(cf, mut files)| {
            files.sort_by_key(|f| (std::cmp::Reverse(f.level), f.largest_seqno));
            (cf, files.into_iter().map(|f| f.file).collect())
        })
        .collect())
}

/// Ingests `files` (listed by [`files_for_ingestion`]) into `cf` of `db` as they are, hard
/// linked. Files the other instance wrote itself (`generated`) keep their sequence numbers
/// (RocksDB raises the instance's own past them), and RocksDB refuses them, changing nothing,
/// when they overlap data already in `cf` or in its memtable. An external file (one at a time)
/// gets a sequence number above every one in `db`: it is the newest.
pub(super) fn ingest_files(db: &DB, cf: &impl AsColumnFamilyRef, files: &[&Path], generated: bool) -> Result<()> {
    let paths = files
        .iter()
        .map(|p| {
            CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| Error::User(format!("rocksdb: file path {} holds a NUL byte", p.display())))
        })
        .collect::<Result<Vec<_>>>()?;
    let ptrs: Vec<*const c_char> = paths.iter().map(|p| p.as_ptr()).collect();
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: the options are created and destroyed here; the path strings, `db` and `cf`
    // outlive the call; an error string RocksDB allocates is copied, then freed with its
    // allocator.
    unsafe {
        let opts = ffi::rocksdb_ingestexternalfileoptions_create();
        ffi::rocksdb_ingestexternalfileoptions_set_allow_db_generated_files(opts, u8::from(generated));
        // DB-generated files keep their sequence numbers: no global one, no snapshot ordering.
        ffi::rocksdb_ingestexternalfileoptions_set_snapshot_consistency(opts, 0);
        ffi::rocksdb_ingestexternalfileoptions_set_write_global_seqno(opts, 0);
        // Overlap with the memtable is refused like any overlap rather than flushed.
        ffi::rocksdb_ingestexternalfileoptions_set_allow_blocking_flush(opts, 0);
        ffi::rocksdb_ingestexternalfileoptions_set_link_files(opts, 1);
        // Nothing of the files goes into the block cache now: reads load what they need.
        ffi::rocksdb_ingestexternalfileoptions_set_fill_cache(opts, 0);
        ffi::rocksdb_ingestexternalfileoptions_set_prefetch_lmax_index_and_filter_blocks(opts, 0);
        ffi::rocksdb_ingest_external_file_cf(db.as_raw_ptr(), cf.inner(), ptrs.as_ptr(), ptrs.len(), opts, &mut err);
        ffi::rocksdb_ingestexternalfileoptions_destroy(opts);
        if !err.is_null() {
            let msg = CStr::from_ptr(err).to_string_lossy().into_owned();
            ffi::rocksdb_free(err.cast());
            return Err(Error::User(format!("rocksdb: ingest: {msg}")));
        }
    }
    Ok(())
}

/// No IDENTITY file at open (the instance's id is kept in its manifest): one file write and
/// sync less per open.
pub(super) fn skip_identity_file(opts: &mut Options) {
    // SAFETY: `opts` is a live options object; the setter only stores a flag in it.
    unsafe {
        ffi::rocksdb_options_set_write_identity_file(opts.as_raw_ptr(), 0);
    }
}
