//! x86_64 guest layout, boot protocol and firmware tables.
pub mod acpi;
pub mod boot;
pub mod layout;
