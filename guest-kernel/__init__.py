# Package marker only: lets setuptools ship guest-kernel/ (build.sh, config, patches) as the package data "vmm.guest_kernel".
