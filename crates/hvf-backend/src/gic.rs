//! The in-framework GICv3 (`hv_gic.h`, `hv_gic_parameters.h`, `hv_gic_state.h`,
//! macOS 15+), looked up with `dlsym` when first needed so that the binary loads on
//! older macOS and says why the GIC is missing instead of failing to launch.

use std::ffi::{c_void, CStr};
use std::sync::OnceLock;

use crate::bindings::{hv_ipa_t, hv_return_t, hv_vcpu_t};

/// Opaque `hv_gic_config_t`.
pub type GicConfig = *mut c_void;
/// Opaque `hv_gic_state_t`.
pub type GicState = *mut c_void;

/// The GIC functions, resolved once per process.
#[derive(Debug)]
pub struct GicApi {
    pub config_create: unsafe extern "C" fn() -> GicConfig,
    pub config_set_distributor_base: unsafe extern "C" fn(GicConfig, hv_ipa_t) -> hv_return_t,
    pub config_set_redistributor_base: unsafe extern "C" fn(GicConfig, hv_ipa_t) -> hv_return_t,
    pub create: unsafe extern "C" fn(GicConfig) -> hv_return_t,
    pub set_spi: unsafe extern "C" fn(u32, bool) -> hv_return_t,
    pub get_distributor_size: unsafe extern "C" fn(*mut usize) -> hv_return_t,
    pub get_redistributor_region_size: unsafe extern "C" fn(*mut usize) -> hv_return_t,
    pub get_redistributor_size: unsafe extern "C" fn(*mut usize) -> hv_return_t,
    pub get_redistributor_base: unsafe extern "C" fn(hv_vcpu_t, *mut hv_ipa_t) -> hv_return_t,
    pub get_spi_interrupt_range: unsafe extern "C" fn(*mut u32, *mut u32) -> hv_return_t,
    pub get_icc_reg: unsafe extern "C" fn(hv_vcpu_t, u16, *mut u64) -> hv_return_t,
    pub set_icc_reg: unsafe extern "C" fn(hv_vcpu_t, u16, u64) -> hv_return_t,
    pub state_create: unsafe extern "C" fn() -> GicState,
    pub state_get_size: unsafe extern "C" fn(GicState, *mut usize) -> hv_return_t,
    pub state_get_data: unsafe extern "C" fn(GicState, *mut c_void) -> hv_return_t,
    pub set_state: unsafe extern "C" fn(*const c_void, usize) -> hv_return_t,
    /// `os_release` (libSystem) for the config and state objects.
    pub os_release: unsafe extern "C" fn(*mut c_void),
}

/// Why the GIC API is unavailable.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the in-framework GIC needs macOS 15 or later: {symbol} is missing from \
     Hypervisor.framework on this system"
)]
pub struct GicUnavailable {
    /// The first symbol not found.
    pub symbol: &'static str,
}

fn lookup(symbol: &'static CStr) -> Result<*mut c_void, GicUnavailable> {
    // SAFETY: RTLD_DEFAULT searches the images already loaded (Hypervisor.framework is
    // linked, libSystem always is) and `symbol` is a NUL-terminated string.
    let ptr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, symbol.as_ptr()) };
    if ptr.is_null() {
        Err(GicUnavailable {
            symbol: symbol.to_str().unwrap_or("hv_gic_*"),
        })
    } else {
        Ok(ptr)
    }
}

/// Resolves `$name` and casts it to the function pointer type of the field it fills.
macro_rules! resolve {
    ($name:literal as $ty:ty) => {{
        let ptr = lookup($name)?;
        // SAFETY: `ptr` is the non-null address of the exported function `$name`,
        // whose C prototype (from Apple's hv_gic*.h / os/object.h) matches the field
        // type this expression initializes; data and function pointers have the same
        // size and representation on arm64 macOS.
        unsafe { std::mem::transmute::<*mut c_void, $ty>(ptr) }
    }};
}

impl GicApi {
    fn resolve() -> Result<Self, GicUnavailable> {
        Ok(Self {
            config_create: resolve!(c"hv_gic_config_create" as unsafe extern "C" fn() -> GicConfig),
            config_set_distributor_base: resolve!(
                c"hv_gic_config_set_distributor_base"
                    as unsafe extern "C" fn(GicConfig, hv_ipa_t) -> hv_return_t
            ),
            config_set_redistributor_base: resolve!(
                c"hv_gic_config_set_redistributor_base"
                    as unsafe extern "C" fn(GicConfig, hv_ipa_t) -> hv_return_t
            ),
            create: resolve!(c"hv_gic_create" as unsafe extern "C" fn(GicConfig) -> hv_return_t),
            set_spi: resolve!(c"hv_gic_set_spi" as unsafe extern "C" fn(u32, bool) -> hv_return_t),
            get_distributor_size: resolve!(
                c"hv_gic_get_distributor_size" as unsafe extern "C" fn(*mut usize) -> hv_return_t
            ),
            get_redistributor_region_size: resolve!(
                c"hv_gic_get_redistributor_region_size"
                    as unsafe extern "C" fn(*mut usize) -> hv_return_t
            ),
            get_redistributor_size: resolve!(
                c"hv_gic_get_redistributor_size" as unsafe extern "C" fn(*mut usize) -> hv_return_t
            ),
            get_redistributor_base: resolve!(
                c"hv_gic_get_redistributor_base"
                    as unsafe extern "C" fn(hv_vcpu_t, *mut hv_ipa_t) -> hv_return_t
            ),
            get_spi_interrupt_range: resolve!(
                c"hv_gic_get_spi_interrupt_range"
                    as unsafe extern "C" fn(*mut u32, *mut u32) -> hv_return_t
            ),
            get_icc_reg: resolve!(
                c"hv_gic_get_icc_reg"
                    as unsafe extern "C" fn(hv_vcpu_t, u16, *mut u64) -> hv_return_t
            ),
            set_icc_reg: resolve!(
                c"hv_gic_set_icc_reg" as unsafe extern "C" fn(hv_vcpu_t, u16, u64) -> hv_return_t
            ),
            state_create: resolve!(c"hv_gic_state_create" as unsafe extern "C" fn() -> GicState),
            state_get_size: resolve!(
                c"hv_gic_state_get_size"
                    as unsafe extern "C" fn(GicState, *mut usize) -> hv_return_t
            ),
            state_get_data: resolve!(
                c"hv_gic_state_get_data"
                    as unsafe extern "C" fn(GicState, *mut c_void) -> hv_return_t
            ),
            set_state: resolve!(
                c"hv_gic_set_state" as unsafe extern "C" fn(*const c_void, usize) -> hv_return_t
            ),
            os_release: resolve!(c"os_release" as unsafe extern "C" fn(*mut c_void)),
        })
    }

    /// The process-wide GIC API, or why it is unavailable.
    pub fn get() -> Result<&'static GicApi, GicUnavailable> {
        static API: OnceLock<Result<GicApi, GicUnavailable>> = OnceLock::new();
        API.get_or_init(Self::resolve)
            .as_ref()
            .map_err(Clone::clone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The macOS major version (`kern.osproductversion`, e.g. "15.1").
    fn macos_major() -> u32 {
        let mut buf = [0u8; 32];
        let mut len = buf.len();
        // SAFETY: the name is NUL-terminated, `buf` and `len` are valid and `len`
        // says how much of `buf` may be written.
        let rc = unsafe {
            libc::sysctlbyname(
                c"kern.osproductversion".as_ptr(),
                buf.as_mut_ptr().cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(rc, 0, "sysctl kern.osproductversion");
        let text = String::from_utf8_lossy(&buf[..len]);
        text.trim_end_matches('\0')
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap()
    }

    /// Every `hv_gic_*` symbol the backend looks up resolves on macOS 15 and
    /// later; before, the lookup fails with the message a user sees. Needs no
    /// hypervisor (the macOS workflow runs it on hosted runners); the other `hv_*`
    /// functions are linked, so they resolved when this binary loaded.
    #[test]
    fn gic_symbols_resolve_on_macos_15_or_fail_cleanly() {
        match (macos_major(), GicApi::get()) {
            (15.., Ok(_)) => {}
            (15.., Err(e)) => panic!("macOS 15 or later lacks a GIC symbol: {e}"),
            (_, Ok(_)) => panic!("the GIC API resolved before macOS 15"),
            (_, Err(e)) => assert!(e.to_string().contains("needs macOS 15"), "{e}"),
        }
    }
}
