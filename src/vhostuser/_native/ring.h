/*
 * vhostuser native hot path: declarations.
 *
 * Everything between the CDEF markers is parsed by cffi (build_native.py), so
 * it must stay in the subset of C that cffi's cdef understands (no macros with
 * expressions, no inline functions).
 *
 * SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 */
#ifndef VHOSTUSER_RING_H
#define VHOSTUSER_RING_H

#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN */
/* ABI version of this extension; the Python side checks it at import. */
int vu_native_abi_version(void);
/* CDEF-END */

#endif
