//! A remote layer's life: resolve, read footer and TOC, build the FUSE index, mount, check,
//! refresh and unmount.
