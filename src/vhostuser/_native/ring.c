/*
 * vhostuser native hot path: implementation.
 *
 * SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 */
#include "ring.h"

int vu_native_abi_version(void)
{
    return 1;
}
