// The pcache library's public surface: the cache engine, its devices and its errors.
export { PcacheError, type PcacheErrorCode } from './lib/errors.js';
export type { BlockDevice, BlockingIo } from './device/block_device.js';
export { MemoryDevice } from './device/memory_device.js';
export { FileDevice, type FileDeviceOptions } from './device/file_device.js';
