// The pcache library's public surface: the cache engine, its devices, the NBD server, and its errors.
export { PcacheError, type PcacheErrorCode } from './lib/errors.js';
export type { BlockDevice, BlockingIo } from './device/block_device.js';
export { MemoryDevice } from './device/memory_device.js';
export { FileDevice, type FileDeviceOptions } from './device/file_device.js';
export { DeviceExport } from './device/device_export.js';
export { Cache, dmStatusLine, defaultTuning, eagerWriteback, type CacheOpenOptions, type CacheStatus, type CacheTuning, type FormatOptions } from './cache/cache.js';
export { checkCacheDevice, type CheckReport, type CheckSummary } from './cache/cache_check.js';
export { NbdServer, type NbdServerOptions, type NbdListenAddress, type NbdLimits } from './nbd/server/server.js';
export type { Export } from './nbd/server/export.js';
export { ExportMap, type ExportCatalog, type ExportEntry } from './nbd/server/export_catalog.js';
export type { BlockStatusExtent } from './nbd/protocol/command_types.js';
export { NbdClient } from './nbd/client/client.js';
export { NbdRemoteDevice } from './nbd/client/remote_device.js';
export { parseNbdUri, looksLikeNbdUri, type NbdUri } from './nbd/client/uri.js';
