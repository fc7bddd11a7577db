//! The C ABI between Envoy and this module: the event hooks Envoy calls (`envoy_dynamic_module_on_*`)
//! and the callbacks the module calls (`envoy_dynamic_module_callback_*`), declared by hand from
//! Envoy's `source/extensions/dynamic_modules/abi/abi.h` and checked symbol by symbol against
//! `nm -D` of the Envoy 1.40 binary (ABI v0.2.0). The only module with `unsafe`.
//!
//! Rules kept here:
//! - every hook body runs inside [`guard`] (`catch_unwind`): a panic never unwinds into Envoy; a
//!   panic while deciding answers 503 (`keys_unavailable`-style error), never lets the request by;
//! - Envoy's buffers are read only within the hook that received them, through [`envoy_bytes`]
//!   (a null pointer or zero length reads as empty); lengths come from Envoy, never from the
//!   request, so no request data can make the module read out of bounds;
//! - module pointers handed to Envoy are `Box::into_raw` of the types below and are freed only by
//!   the matching `*_destroy` hook.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;

use crate::Level;
use crate::filter::{Filter, FilterConfig, METADATA_NAMESPACE, Step, Stream};
use crate::metrics::{self, StatIds};

/// The ABI version this module is written against (Envoy 1.40 reports v0.2.0).
const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// `envoy_dynamic_module_type_envoy_buffer`: bytes owned by Envoy, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const c_char,
    length: usize,
}

/// `envoy_dynamic_module_type_module_buffer`: bytes owned by the module, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    ptr: *const c_char,
    length: usize,
}

impl ModuleBuffer {
    fn of(s: &str) -> ModuleBuffer {
        ModuleBuffer {
            ptr: s.as_ptr().cast(),
            length: s.len(),
        }
    }

    /// A null value: `set_header` removes the header.
    const NULL: ModuleBuffer = ModuleBuffer {
        ptr: ptr::null(),
        length: 0,
    };
}

/// `envoy_dynamic_module_type_module_http_header`.
#[repr(C)]
pub struct ModuleHttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

/// `envoy_dynamic_module_type_module_key_value_pair`.
#[repr(C)]
pub struct ModuleKeyValuePair {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

/// `envoy_dynamic_module_type_envoy_http_header`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

const EMPTY_HEADER: EnvoyHttpHeader = EnvoyHttpHeader {
    key_ptr: ptr::null(),
    key_length: 0,
    value_ptr: ptr::null(),
    value_length: 0,
};

/// `envoy_dynamic_module_type_http_header_type_RequestHeader`.
const REQUEST_HEADER: u32 = 0;
/// `..._request_headers_status_Continue` (also body, trailers and response statuses).
const CONTINUE: u32 = 0;
/// `..._request_headers_status_StopIteration`, `..._request_body_status_StopIterationAndBuffer`,
/// `..._request_trailers_status_StopIteration`: all 1.
const STOP: u32 = 1;
/// `envoy_dynamic_module_type_metrics_result_Success`.
const METRICS_SUCCESS: u32 = 0;
/// The scheduler event that resumes a stream after a key refetch.
const EVENT_KEYS: u64 = 1;
/// The config scheduler event that hands pending counts to Envoy's stats (main thread).
const EVENT_FLUSH: u64 = 2;

type EnvoyFilterPtr = *mut c_void;

unsafe extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_is_validation_mode() -> bool;
    fn envoy_dynamic_module_callback_http_get_headers_size(filter: EnvoyFilterPtr, header_type: u32) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: EnvoyFilterPtr,
        header_type: u32,
        result_headers: *mut EnvoyHttpHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: EnvoyFilterPtr,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_add_header(
        filter: EnvoyFilterPtr,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter: EnvoyFilterPtr,
        status_code: u32,
        headers_vector: *mut ModuleHttpHeader,
        headers_vector_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    /// Sets every entry under `ns`, resolving the namespace once (Envoy 1.40 has it).
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
        filter: EnvoyFilterPtr,
        ns: ModuleBuffer,
        entries: *const ModuleKeyValuePair,
        entries_length: usize,
    );
    fn envoy_dynamic_module_callback_get_most_specific_route_config(filter: EnvoyFilterPtr) -> *const c_void;
    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: EnvoyFilterPtr);
    fn envoy_dynamic_module_callback_http_filter_scheduler_new(filter: EnvoyFilterPtr) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler: *mut c_void, event_id: u64);
    fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        histogram_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_record_histogram_value(
        filter: EnvoyFilterPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(config: *mut c_void) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(scheduler: *mut c_void, event_id: u64);
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: *mut c_void);
}

/// Envoy's bytes as a slice; empty for a null pointer or zero length.
///
/// # Safety
/// `ptr` must point to `len` readable bytes that stay valid for `'a` (Envoy guarantees this
/// until the end of the hook that received them).
unsafe fn envoy_bytes<'a>(ptr: *const c_char, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: non-null, and the caller guarantees `len` readable bytes for `'a`.
    unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) }
}

/// A line in Envoy's log.
pub fn log(level: Level, message: &str) {
    // SAFETY: the buffer points into `message`, alive for the call; Envoy's logger is
    // thread-safe and copies the message.
    unsafe { envoy_dynamic_module_callback_log(level as u32, ModuleBuffer::of(message)) }
}

/// Run a hook body; `None` when it panicked (the panic is logged and goes no further).
fn guard<T>(body: impl FnOnce() -> T) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => Some(v),
        Err(_) => {
            log(
                Level::Error,
                "audgate: internal error in the filter (panic caught at the Envoy boundary)",
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One stream, as the filter logic sees it
// ---------------------------------------------------------------------------------------------

/// The Envoy side of one stream during one hook: made at the start of a hook, dropped at its
/// end, never stored (so nothing borrowed from it outlives the hook).
struct EnvoyStream {
    envoy: EnvoyFilterPtr,
    /// Envoy's ids of the config's stats, once the stream's config is known.
    stats: StatIds,
    /// Whether a local reply was sent in this hook (a panic after it must not send another).
    responded: bool,
}

impl EnvoyStream {
    fn new(envoy: EnvoyFilterPtr) -> EnvoyStream {
        EnvoyStream {
            envoy,
            stats: StatIds::default(),
            responded: false,
        }
    }

    /// A 503 for a request whose check failed inside the module (after a caught panic).
    fn internal_error(&mut self) {
        if self.responded {
            return;
        }
        let body = r#"{"error":"keys_unavailable","error_description":"internal error in the audgate filter"}"#;
        self.send_response(
            503,
            &[("content-type", "application/json"), ("retry-after", "5")],
            body,
            "audgate_internal_error",
        );
    }
}

impl Stream for EnvoyStream {
    fn request_headers(&self) -> Vec<(&[u8], &[u8])> {
        // SAFETY: `envoy` is the live filter of the current hook (worker thread).
        let count = unsafe { envoy_dynamic_module_callback_http_get_headers_size(self.envoy, REQUEST_HEADER) };
        if count == 0 {
            return Vec::new();
        }
        let mut raw = vec![EMPTY_HEADER; count];
        // SAFETY: `raw` holds exactly `count` entries, the size Envoy reported for this map in
        // this same hook, as get_headers requires.
        let ok =
            unsafe { envoy_dynamic_module_callback_http_get_headers(self.envoy, REQUEST_HEADER, raw.as_mut_ptr()) };
        if !ok {
            return Vec::new();
        }
        raw.iter()
            .map(|h| {
                // SAFETY: Envoy filled these from its header map; abi.h guarantees each key and
                // value buffer "until the end of the current event hook unless the setter
                // callbacks are called". The slices borrow `self`, which lives only for this hook
                // (see `EnvoyStream`), and every call that changes the stream (set/remove header,
                // local reply, metadata, counters) takes `&mut self`: the borrow checker ends
                // every use of these slices before a setter can run.
                unsafe {
                    (
                        envoy_bytes(h.key_ptr, h.key_length),
                        envoy_bytes(h.value_ptr, h.value_length),
                    )
                }
            })
            .collect()
    }

    fn route_name(&self) -> Option<&str> {
        // SAFETY: live filter; the result is null or a pointer returned by our
        // per_route_config_new (a `Box<RouteName>`), alive while the route config is, which
        // outlives the stream's hooks (the borrow is tied to this hook's `self`).
        let config = unsafe { envoy_dynamic_module_callback_get_most_specific_route_config(self.envoy) };
        if config.is_null() {
            return None;
        }
        // SAFETY: see above; only read.
        let route = unsafe { &*config.cast::<RouteName>() };
        Some(&route.0)
    }

    fn set_request_header(&mut self, name: &str, value: &str) {
        // SAFETY: live filter of this hook; both buffers point into borrowed strings alive for the call.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.envoy,
                REQUEST_HEADER,
                ModuleBuffer::of(name),
                ModuleBuffer::of(value),
            );
        }
    }

    fn add_request_header(&mut self, name: &str, value: &str) {
        // SAFETY: live filter of this hook; both buffers point into borrowed strings alive for the call.
        unsafe {
            envoy_dynamic_module_callback_http_add_header(
                self.envoy,
                REQUEST_HEADER,
                ModuleBuffer::of(name),
                ModuleBuffer::of(value),
            );
        }
    }

    fn remove_request_header(&mut self, name: &str) {
        // SAFETY: as above; a null value asks Envoy to remove the header.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.envoy,
                REQUEST_HEADER,
                ModuleBuffer::of(name),
                ModuleBuffer::NULL,
            );
        }
    }

    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &str, details: &str) {
        let mut vector: Vec<ModuleHttpHeader> = headers
            .iter()
            .map(|(k, v)| ModuleHttpHeader {
                key_ptr: k.as_ptr().cast(),
                key_length: k.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect();
        self.responded = true;
        // SAFETY: live filter; `vector` and the strings it points into, `body` and `details`
        // outlive the call, and Envoy copies them.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.envoy,
                u32::from(status),
                vector.as_mut_ptr(),
                vector.len(),
                ModuleBuffer::of(body),
                ModuleBuffer::of(details),
            );
        }
    }

    fn set_metadata(&mut self, entries: &[(&str, &str)]) {
        let pairs: Vec<ModuleKeyValuePair> = entries
            .iter()
            .map(|(k, v)| ModuleKeyValuePair {
                key_ptr: k.as_ptr().cast(),
                key_length: k.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect();
        // SAFETY: live filter; `pairs` and the strings it points into outlive the call, and
        // Envoy copies them into the stream's metadata.
        unsafe {
            envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
                self.envoy,
                ModuleBuffer::of(METADATA_NAMESPACE),
                pairs.as_ptr(),
                pairs.len(),
            );
        }
    }

    fn record_duration(&mut self, micros: u64) {
        if let Some(id) = self.stats.check_duration {
            // SAFETY: live filter of a config that defined histogram `id` without labels; no
            // label buffers are passed (null with length 0, Envoy's unlabelled path).
            let _ = unsafe {
                envoy_dynamic_module_callback_http_filter_record_histogram_value(self.envoy, id, ptr::null(), 0, micros)
            };
        }
    }
}

/// A scheduler for one stream, usable from the background thread: committing an event to a
/// stream Envoy has destroyed meanwhile is a no-op on Envoy's side (it holds a weak reference).
struct Scheduler(*mut c_void);

// SAFETY: Envoy documents the scheduler as usable "from any thread including the ones managed by
// the module": commit posts to the stream's worker dispatcher, delete only drops a weak reference.
unsafe impl Send for Scheduler {}
// SAFETY: as above; the pointer is never dereferenced by the module.
unsafe impl Sync for Scheduler {}

impl Scheduler {
    fn commit(&self, event: u64) {
        // SAFETY: a scheduler from scheduler_new, not yet deleted (Drop deletes it).
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_commit(self.0, event) }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: created by scheduler_new and deleted exactly once, here.
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_delete(self.0) }
    }
}

/// Envoy's scheduler for one filter config: commits run `on_http_filter_config_scheduled` on
/// Envoy's main thread.
struct ConfigScheduler(*mut c_void);

// SAFETY: Envoy's config scheduler holds only a weak reference to the config; `commit` locks it
// and posts to the main thread's dispatcher (a no-op once the config is gone), which abi.h
// documents as usable "from any thread including the ones managed by the module".
unsafe impl Send for ConfigScheduler {}
// SAFETY: as above; the pointer is never dereferenced by the module.
unsafe impl Sync for ConfigScheduler {}

impl ConfigScheduler {
    fn commit(&self, event: u64) {
        // SAFETY: a scheduler from config_scheduler_new, not yet deleted (Drop deletes it).
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_commit(self.0, event) }
    }
}

impl Drop for ConfigScheduler {
    fn drop(&mut self) {
        // SAFETY: created by config_scheduler_new and deleted exactly once, here.
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.0) }
    }
}

/// The in-module stream: what `on_http_filter_new` hands Envoy.
struct StreamState {
    filter: Filter,
    stats: StatIds,
}

/// A per-route config: the audgate route's name.
struct RouteName(String);

/// Borrow the stream state behind a module pointer.
///
/// # Safety
/// `module` must be a pointer returned by [`envoy_dynamic_module_on_http_filter_new`] and not yet
/// destroyed, used on the stream's worker thread only (Envoy's contract for filter hooks).
unsafe fn stream_state<'a>(module: *const c_void) -> Option<&'a mut StreamState> {
    // SAFETY: see the function's contract; null yields None.
    unsafe { module.cast_mut().cast::<StreamState>().as_mut() }
}

/// Carry out a step: continue, stop, or stop and have the background thread refetch keys.
fn run(step: Step, state: &mut StreamState, stream: &mut EnvoyStream) -> u32 {
    match step {
        Step::Continue => CONTINUE,
        Step::Stop => STOP,
        Step::WaitForKeys(refetch) => {
            // SAFETY: live filter of this hook (worker thread), as scheduler_new requires.
            let raw = unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(stream.envoy) };
            let spawned = !raw.is_null() && {
                let scheduler = Scheduler(raw);
                state.filter.spawn(async move {
                    refetch.run().await;
                    scheduler.commit(EVENT_KEYS);
                })
            };
            if spawned {
                state.filter.waiting = true;
                return STOP;
            }
            // no background thread (validation mode): decide now with the keys at hand
            match state.filter.on_resume(stream) {
                Step::Continue => CONTINUE,
                _ => STOP,
            }
        }
    }
}

/// Define the module's stats in a filter config (only possible during `config_new`). A stat
/// Envoy refuses is logged and left out; the filter works without it.
fn define_stats(envoy_config: *mut c_void) -> StatIds {
    let define = |(name, labels): (&str, &[&str]), histogram: bool| -> Option<usize> {
        let labels: Vec<ModuleBuffer> = labels.iter().map(|l| ModuleBuffer::of(l)).collect();
        let mut id = 0usize;
        // SAFETY: this hook's config pointer (stats are defined here, before Envoy freezes
        // them); name and labels point into 'static strings; `id` is writable.
        let result = unsafe {
            if histogram {
                envoy_dynamic_module_callback_http_filter_config_define_histogram(
                    envoy_config,
                    ModuleBuffer::of(name),
                    labels.as_ptr(),
                    labels.len(),
                    &mut id,
                )
            } else {
                envoy_dynamic_module_callback_http_filter_config_define_counter(
                    envoy_config,
                    ModuleBuffer::of(name),
                    labels.as_ptr(),
                    labels.len(),
                    &mut id,
                )
            }
        };
        if result == METRICS_SUCCESS {
            Some(id)
        } else {
            log(Level::Warn, &format!("audgate: cannot define {name} (result {result})"));
            None
        }
    };
    StatIds {
        checks: define(metrics::CHECKS, false),
        check_duration: define(metrics::CHECK_DURATION, true),
        cache_hits: define(metrics::CACHE_HITS, false),
        cache_misses: define(metrics::CACHE_MISSES, false),
        jwks_refresh: define(metrics::JWKS_REFRESH, false),
        config_reloads: define(metrics::CONFIG_RELOADS, false),
    }
}

/// Add the counts made off Envoy's workers to Envoy's counters (main thread).
fn flush(envoy_config: *mut c_void, config: &FilterConfig) {
    let add = |id: Option<usize>, labels: &[&str], value: u64| {
        let Some(id) = id else { return };
        if value == 0 {
            return;
        }
        let labels: Vec<ModuleBuffer> = labels.iter().map(|l| ModuleBuffer::of(l)).collect();
        // SAFETY: the config pointer Envoy passed to this main-thread hook, which defined
        // counter `id` with exactly these labels; the buffers outlive the call.
        let _ = unsafe {
            envoy_dynamic_module_callback_http_filter_config_increment_counter(
                envoy_config,
                id,
                labels.as_ptr(),
                labels.len(),
                value,
            )
        };
    };
    let stats = &config.stats;
    let taken = config.shared.pending.take();
    add(stats.cache_hits, &[], taken.cache_hits);
    add(stats.cache_misses, &[], taken.cache_misses);
    for (result, n) in &taken.reloads {
        add(stats.config_reloads, &[result], *n);
    }
    for (issuer, result, n) in &taken.jwks {
        add(stats.jwks_refresh, &[issuer, result], *n);
    }
    for (route, decision, reason, n) in &taken.checks {
        add(stats.checks, &[route, decision, reason], *n);
    }
}

// ---------------------------------------------------------------------------------------------
// Event hooks (the 21 Envoy 1.40 resolves for an HTTP filter, plus the per-route pair)
// ---------------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    ABI_VERSION.as_ptr().cast()
}

/// `config` is the filter_config string: the path of the audgate config file. NULL rejects the
/// filter config (Envoy refuses to start) after logging audgate's file:line:column errors.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    envoy_config: *mut c_void,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    guard(|| {
        crate::init_tracing();
        // SAFETY: Envoy's buffer is valid for the duration of this hook; copied right away.
        let bytes = unsafe { envoy_bytes(config.ptr, config.length) };
        let Ok(path) = std::str::from_utf8(bytes) else {
            log(Level::Error, "audgate: filter_config must be a UTF-8 path");
            return ptr::null();
        };
        // SAFETY: no arguments; called on the main thread, where config_new runs.
        let validating = unsafe { envoy_dynamic_module_callback_is_validation_mode() };
        let mut loaded = match FilterConfig::load(path, !validating) {
            Ok(c) => c,
            Err(errors) => {
                for e in errors {
                    log(Level::Error, &e);
                }
                return ptr::null();
            }
        };
        loaded.stats = define_stats(envoy_config);
        // SAFETY: this hook's config pointer, on the main thread; the scheduler is deleted by
        // its Drop, when the FilterConfig (its owner, through `Shared`) goes.
        let raw = unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(envoy_config) };
        if !raw.is_null() {
            let scheduler = ConfigScheduler(raw);
            let _ = loaded
                .shared
                .notify
                .set(Box::new(move || scheduler.commit(EVENT_FLUSH)));
        }
        Box::into_raw(Box::new(loaded)).cast_const().cast()
    })
    .unwrap_or(ptr::null())
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    guard(|| {
        if !config.is_null() {
            // SAFETY: returned by config_new from Box::into_raw; Envoy destroys it once,
            // after every stream of the config (stops the background thread).
            drop(unsafe { Box::from_raw(config.cast_mut().cast::<FilterConfig>()) });
        }
    });
}

/// The background thread asked for its counts to be added to Envoy's stats (main thread).
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    envoy_config: *mut c_void,
    config: *const c_void,
    event_id: u64,
) {
    guard(|| {
        // SAFETY: returned by config_new, alive until config_destroy; Envoy runs this hook on
        // the main thread only while the config lives (its scheduler holds a weak reference).
        let Some(config) = (unsafe { config.cast::<FilterConfig>().as_ref() }) else {
            return;
        };
        if event_id == EVENT_FLUSH {
            flush(envoy_config, config);
        }
    });
}

/// A per-route config: the name of the audgate route to use (as ext_authz's `audgate.route`).
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    guard(|| {
        // SAFETY: valid for this hook; copied right away.
        let bytes = unsafe { envoy_bytes(config.ptr, config.length) };
        let name = String::from_utf8_lossy(bytes).trim().to_owned();
        if name.is_empty() || name.chars().any(char::is_control) {
            log(
                Level::Error,
                "audgate: a per-route filter_config must be an audgate route name",
            );
            return ptr::null();
        }
        Box::into_raw(Box::new(RouteName(name))).cast_const().cast()
    })
    .unwrap_or(ptr::null())
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(config: *const c_void) {
    guard(|| {
        if !config.is_null() {
            // SAFETY: returned by per_route_config_new from Box::into_raw; destroyed once.
            drop(unsafe { Box::from_raw(config.cast_mut().cast::<RouteName>()) });
        }
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    _envoy: EnvoyFilterPtr,
) -> *const c_void {
    guard(|| {
        // SAFETY: returned by config_new, alive until config_destroy, which Envoy calls only
        // after the config's streams are gone; only read.
        let Some(config) = (unsafe { config.cast::<FilterConfig>().as_ref() }) else {
            return ptr::null();
        };
        let state = StreamState {
            filter: Filter::new(config),
            stats: config.stats,
        };
        Box::into_raw(Box::new(state)).cast_const().cast()
    })
    .unwrap_or(ptr::null())
}

/// Where the decision is made. A panic answers 503 and stops the request.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: EnvoyFilterPtr,
    module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    let mut stream = EnvoyStream::new(envoy);
    let status = guard(|| {
        // SAFETY: Envoy passes this stream's module pointer on its worker thread.
        let Some(state) = (unsafe { stream_state(module) }) else {
            stream.internal_error();
            return STOP;
        };
        stream.stats = state.stats;
        let step = state.filter.on_request_headers(&mut stream);
        run(step, state, &mut stream)
    });
    status.unwrap_or_else(|| {
        stream.internal_error();
        STOP
    })
}

/// A refetch ended: decide again and continue or answer.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    envoy: EnvoyFilterPtr,
    module: *const c_void,
    event_id: u64,
) {
    let mut stream = EnvoyStream::new(envoy);
    let done = guard(|| {
        // SAFETY: this stream's module pointer, on its worker thread (the scheduler posts there).
        let Some(state) = (unsafe { stream_state(module) }) else {
            return;
        };
        if event_id != EVENT_KEYS || !state.filter.waiting {
            return;
        }
        stream.stats = state.stats;
        if matches!(state.filter.on_resume(&mut stream), Step::Continue) {
            // SAFETY: live filter on its worker thread; the stream was stopped in request_headers.
            unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(envoy) }
        }
    });
    if done.is_none() {
        stream.internal_error();
    }
}

/// While a stream waits for keys, its body is buffered (and its trailers held).
fn waiting(module: *const c_void) -> bool {
    // SAFETY: this stream's module pointer on its worker thread; only read.
    unsafe { stream_state(module) }.is_some_and(|s| s.filter.waiting)
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _envoy: EnvoyFilterPtr,
    module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    guard(|| if waiting(module) { STOP } else { CONTINUE }).unwrap_or(STOP)
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _envoy: EnvoyFilterPtr,
    module: *const c_void,
) -> u32 {
    guard(|| if waiting(module) { STOP } else { CONTINUE }).unwrap_or(STOP)
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _envoy: EnvoyFilterPtr,
    _module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _envoy: EnvoyFilterPtr,
    _module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _envoy: EnvoyFilterPtr,
    _module: *const c_void,
) -> u32 {
    CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(_envoy: EnvoyFilterPtr, _module: *const c_void) {}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(module: *const c_void) {
    guard(|| {
        if !module.is_null() {
            // SAFETY: returned by filter_new from Box::into_raw; Envoy destroys it once. A
            // refetch still running holds only the scheduler, whose commit becomes a no-op.
            drop(unsafe { Box::from_raw(module.cast_mut().cast::<StreamState>()) });
        }
    });
}

// Hooks Envoy 1.40 requires but audgate does not use (HTTP callouts, streams, watermarks). Their
// trailing arguments are not declared: nothing is read, and the C calling convention lets the
// callee ignore them.

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _envoy: EnvoyFilterPtr,
    _module: *const c_void,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _envoy: EnvoyFilterPtr,
    _module: *const c_void,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(_envoy: EnvoyFilterPtr, _module: *const c_void) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _envoy: EnvoyFilterPtr,
    _module: *const c_void,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _envoy: EnvoyFilterPtr,
    _module: *const c_void,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _envoy: EnvoyFilterPtr,
    _module: *const c_void,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _envoy: EnvoyFilterPtr,
    _module: *const c_void,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _envoy: EnvoyFilterPtr,
    _module: *const c_void,
) {
}
