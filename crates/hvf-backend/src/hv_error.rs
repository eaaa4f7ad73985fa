//! `hv_return_t` codes (Apple `hv_error.h`) as a typed error that keeps the raw code.

use thiserror::Error;

/// A failed Hypervisor.framework call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{call} failed: {} ({:#010x}){}", name(*code), *code as u32, hint(*code))]
pub struct HvError {
    /// The framework function.
    pub call: &'static str,
    /// The `hv_return_t` it returned.
    pub code: i32,
}

/// `HV_SUCCESS`.
pub const HV_SUCCESS: i32 = 0;
/// `HV_NO_DEVICE`: no VM, vCPU or device (e.g. no GIC).
pub const HV_NO_DEVICE: i32 = 0xfae9_4006_u32 as i32;
/// `HV_DENIED`: the process lacks the hypervisor entitlement (or policy forbids it).
pub const HV_DENIED: i32 = 0xfae9_4007_u32 as i32;

/// The symbolic name of a code from `hv_error.h`.
pub fn name(code: i32) -> &'static str {
    match code as u32 {
        0 => "HV_SUCCESS",
        0xfae9_4001 => "HV_ERROR",
        0xfae9_4002 => "HV_BUSY",
        0xfae9_4003 => "HV_BAD_ARGUMENT",
        0xfae9_4004 => "HV_ILLEGAL_GUEST_STATE",
        0xfae9_4005 => "HV_NO_RESOURCES",
        0xfae9_4006 => "HV_NO_DEVICE",
        0xfae9_4007 => "HV_DENIED",
        0xfae9_400f => "HV_UNSUPPORTED",
        _ => "unknown hv_return_t",
    }
}

fn hint(code: i32) -> &'static str {
    if code == HV_DENIED {
        "; the executable must be signed with the com.apple.security.hypervisor \
         entitlement (see docs/hvf.md)"
    } else {
        ""
    }
}

/// Turns a return code into a result.
pub fn check(call: &'static str, code: i32) -> Result<(), HvError> {
    if code == HV_SUCCESS {
        Ok(())
    } else {
        Err(HvError { call, code })
    }
}

impl From<HvError> for std::io::Error {
    fn from(e: HvError) -> Self {
        std::io::Error::other(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_success_is_ok_and_failure_keeps_code() {
        assert!(check("hv_vm_create", 0).is_ok());
        let e = check("hv_vm_map", 0xfae9_4003_u32 as i32).unwrap_err();
        assert_eq!(e.code as u32, 0xfae9_4003);
        assert_eq!(
            e.to_string(),
            "hv_vm_map failed: HV_BAD_ARGUMENT (0xfae94003)"
        );
    }

    #[test]
    fn denied_error_names_the_entitlement() {
        let e = check("hv_vm_create", HV_DENIED).unwrap_err();
        assert!(e.to_string().contains("com.apple.security.hypervisor"));
    }

    #[test]
    fn unknown_code_is_named_as_unknown() {
        assert_eq!(name(42), "unknown hv_return_t");
    }
}
