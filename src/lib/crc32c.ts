// CRC32C (Castagnoli, reflected polynomial 0x82F63B78, initial and final XOR 0xFFFFFFFF).
//
// pcache protects every metadata record, and optionally every data extent, with CRC32C.
// The computation comes from @node-rs/crc32 (hardware CRC instructions through prebuilt
// binaries). Node's own zlib.crc32 is CRC-32/IEEE, a different polynomial, and must not be
// used for anything on the cache device. Check value: crc32c("123456789") = 0xE3069283.

import { crc32c as nativeCrc32c } from '@node-rs/crc32';

/**
 * CRC32C of `bytes`. `previous` continues an earlier computation, so
 * crc32c(b, crc32c(a)) === crc32c(a ++ b); it also serves as a seed.
 */
export function crc32c(bytes: Uint8Array, previous = 0): number {
  return nativeCrc32c(bytes, previous) >>> 0;
}
