// PageImage: a device's contents as copy-on-write 4 KiB pages, so that snapshots are free.
//
// The crash simulator forks an image for every crash state it builds and for every crash
// point it records, so a fork must cost O(1) and a write after a fork must cost time in
// proportion to the pages it touches, never to the device size. Pages live in a persistent
// radix tree (32-way, path-copying): a fork shares the whole tree, and the first write to a
// shared path copies only the nodes on that path and the one page.
//
// Invariants:
// - a node or page is mutated in place only by the image whose `owner` token it carries; a
//   fork gives both the parent and the child fresh tokens, so neither can touch what they
//   share and every shared node is effectively immutable;
// - a page absent from the tree reads from the optional PageSource (an immutable base image),
//   or as zeroes when there is none;
// - every access lies inside [0, sizeBytes) (asserted: the simulator's callers range-check).

import { assert } from '../src/lib/assert.js';
import { KiB } from '../src/lib/units.js';

export const pageSizeBytes = 4 * KiB;
const fanoutBits = 5;
const fanout = 1 << fanoutBits;
const fanoutMask = fanout - 1;
/** Page indexes go through 32-bit shifts, so a device holds at most 2^31 pages (8 TiB). */
const pageCountMax = 2 ** 31;

/** Immutable contents behind an image's unwritten pages (for example a copied device file). */
export interface PageSource {
  readonly sizeBytes: number;
  /** Fills `target` (one page) with page `pageIndex`; bytes past the end read as zeroes. */
  readPage(pageIndex: number, target: Uint8Array): void;
}

class Branch {
  constructor(
    public owner: number,
    readonly slots: (Branch | Leaf | undefined)[],
  ) {}
}

class Leaf {
  constructor(
    readonly owner: number,
    readonly bytes: Uint8Array,
  ) {}
}

/** Tokens are never reused, so a stale token can never regain write access. */
let nextOwnerToken = 1;
function takeOwnerToken(): number {
  const token = nextOwnerToken;
  nextOwnerToken += 1;
  return token;
}

/** The read side of an image, handed out for snapshots that nobody may change. */
export interface ReadonlyPageImage {
  readonly sizeBytes: number;
  read(target: Uint8Array, offsetBytes: number): void;
  fork(): PageImage;
  /** The stored bytes of one page, or undefined if it was never written (tests; do not mutate). */
  storedPage(pageIndex: number): Uint8Array | undefined;
  forEachStoredPage(visit: (pageIndex: number, bytes: Uint8Array) => void): void;
  /** The pages where this image may differ from `other` (see PageImage). */
  forEachPageDifferentFrom(other: ReadonlyPageImage, visit: (pageIndex: number) => void): void;
}

export class PageImage implements ReadonlyPageImage {
  readonly sizeBytes: number;
  readonly source: PageSource | undefined;
  private readonly levels: number;
  private root: Branch | undefined;
  private owner: number;

  constructor(sizeBytes: number, options: { source?: PageSource } = {}) {
    assert(Number.isSafeInteger(sizeBytes) && sizeBytes > 0, `image size must be positive: ${sizeBytes}`);
    const pageCount = Math.ceil(sizeBytes / pageSizeBytes);
    assert(pageCount <= pageCountMax, `image of ${sizeBytes} bytes has too many pages`);
    if (options.source !== undefined) {
      assert(options.source.sizeBytes === sizeBytes, 'a page source must match the image size');
    }
    this.sizeBytes = sizeBytes;
    this.source = options.source;
    let levels = 1;
    while (fanout ** levels < pageCount) levels += 1;
    this.levels = levels;
    this.root = undefined;
    this.owner = takeOwnerToken();
  }

  /** An image holding a copy of `bytes` (only its non-zero pages are stored). */
  static fromBytes(bytes: Uint8Array): PageImage {
    const image = new PageImage(bytes.length);
    for (let offset = 0; offset < bytes.length; offset += pageSizeBytes) {
      const page = bytes.subarray(offset, Math.min(offset + pageSizeBytes, bytes.length));
      if (!isZero(page)) image.write(page, offset);
    }
    return image;
  }

  /** A copy that shares every page with this image until either side writes. O(1). */
  fork(): PageImage {
    const child = new PageImage(this.sizeBytes, this.source === undefined ? {} : { source: this.source });
    child.root = this.root;
    // Both sides lose write access to what they now share.
    this.owner = takeOwnerToken();
    return child;
  }

  read(target: Uint8Array, offsetBytes: number): void {
    this.checkRange(offsetBytes, target.length);
    // Recovery reads whole segments through here (hundreds of pages per open in the crash
    // simulator, most never written): a stored page is copied without making a view of it,
    // and a run of absent pages is zeroed by one fill (Uint8Array's: a Buffer's own fill
    // checks its arguments in JavaScript on every call).
    let zeroFrom = -1;
    let done = 0;
    while (done < target.length) {
      const position = offsetBytes + done;
      const pageIndex = Math.floor(position / pageSizeBytes);
      const inPage = position - pageIndex * pageSizeBytes;
      const length = Math.min(pageSizeBytes - inPage, target.length - done);
      const leaf = this.lookup(pageIndex);
      if (leaf === undefined && this.source === undefined) {
        if (zeroFrom < 0) zeroFrom = done;
        done += length;
        continue;
      }
      if (zeroFrom >= 0) {
        fillZero(target, zeroFrom, done);
        zeroFrom = -1;
      }
      if (leaf !== undefined) {
        target.set(length === pageSizeBytes ? leaf.bytes : leaf.bytes.subarray(inPage, inPage + length), done);
      } else if (length === pageSizeBytes) {
        this.source?.readPage(pageIndex, target.subarray(done, done + length));
      } else {
        const page = new Uint8Array(pageSizeBytes);
        this.source?.readPage(pageIndex, page);
        target.set(page.subarray(inPage, inPage + length), done);
      }
      done += length;
    }
    if (zeroFrom >= 0) fillZero(target, zeroFrom, done);
  }

  write(source: Uint8Array, offsetBytes: number): void {
    this.checkRange(offsetBytes, source.length);
    let done = 0;
    while (done < source.length) {
      const position = offsetBytes + done;
      const pageIndex = Math.floor(position / pageSizeBytes);
      const inPage = position - pageIndex * pageSizeBytes;
      const length = Math.min(pageSizeBytes - inPage, source.length - done);
      this.writablePage(pageIndex, length === pageSizeBytes).set(source.subarray(done, done + length), inPage);
      done += length;
    }
  }

  /** Makes the range read as zeroes; whole pages are dropped rather than stored as zeroes. */
  zero(offsetBytes: number, lengthBytes: number): void {
    this.checkRange(offsetBytes, lengthBytes);
    let done = 0;
    while (done < lengthBytes) {
      const position = offsetBytes + done;
      const pageIndex = Math.floor(position / pageSizeBytes);
      const inPage = position - pageIndex * pageSizeBytes;
      const length = Math.min(pageSizeBytes - inPage, lengthBytes - done);
      // Without a source an absent page already reads as zeroes; with one it reads the base.
      if (length === pageSizeBytes && this.source === undefined) this.dropPage(pageIndex);
      else if (this.source !== undefined || this.lookup(pageIndex) !== undefined) {
        this.writablePage(pageIndex).fill(0, inPage, inPage + length);
      }
      done += length;
    }
  }

  storedPage(pageIndex: number): Uint8Array | undefined {
    return this.lookup(pageIndex)?.bytes;
  }

  forEachStoredPage(visit: (pageIndex: number, bytes: Uint8Array) => void): void {
    if (this.root !== undefined) walk(this.root, this.levels - 1, 0, visit);
  }

  /**
   * Visits (in increasing order) every page where this image may differ from `other`, an
   * image of the same size and source: a subtree or page both hold as the same object is
   * skipped (shared nodes are never changed, so they hold the same bytes), so two images
   * forked from a common ancestor cost the pages either wrote since, not the device size.
   * A page may be visited although its bytes are equal (written with the same bytes, or
   * stored in one and absent but zero in the other).
   */
  forEachPageDifferentFrom(other: ReadonlyPageImage, visit: (pageIndex: number) => void): void {
    assert(other instanceof PageImage && other.sizeBytes === this.sizeBytes && other.source === this.source, 'compare images of one device');
    diff(this.root, other.root, this.levels - 1, 0, visit);
  }

  private lookup(pageIndex: number): Leaf | undefined {
    let node: Branch | Leaf | undefined = this.root;
    for (let level = this.levels - 1; level >= 0; level -= 1) {
      if (node === undefined) return undefined;
      assert(node instanceof Branch, 'inner levels of the page tree hold branches');
      node = node.slots[(pageIndex >>> (level * fanoutBits)) & fanoutMask];
    }
    assert(node === undefined || node instanceof Leaf, 'the last level of the page tree holds pages');
    return node;
  }

  /**
   * The page's bytes, owned by this image (copied first if shared, created if absent; with
   * `overwritten`, the caller is about to write all of it, so a fresh page is not filled).
   */
  private writablePage(pageIndex: number, overwritten = false): Uint8Array {
    const parent = this.ownedParentOf(pageIndex);
    const slot = pageIndex & fanoutMask;
    const existing = parent.slots[slot];
    assert(existing === undefined || existing instanceof Leaf, 'the last level of the page tree holds pages');
    if (existing !== undefined && existing.owner === this.owner) return existing.bytes;
    let bytes: Uint8Array;
    if (overwritten) {
      // The caller writes the whole page: what it held need not be copied first.
      bytes = new Uint8Array(pageSizeBytes);
    } else if (existing !== undefined) {
      bytes = existing.bytes.slice();
    } else {
      bytes = new Uint8Array(pageSizeBytes);
      this.source?.readPage(pageIndex, bytes);
    }
    parent.slots[slot] = new Leaf(this.owner, bytes);
    return bytes;
  }

  private dropPage(pageIndex: number): void {
    if (this.lookup(pageIndex) === undefined) return;
    this.ownedParentOf(pageIndex).slots[pageIndex & fanoutMask] = undefined;
  }

  /** Walks to the branch holding the page's slot, copying every shared branch on the way. */
  private ownedParentOf(pageIndex: number): Branch {
    this.root = this.owned(this.root);
    let branch = this.root;
    for (let level = this.levels - 1; level >= 1; level -= 1) {
      const slot = (pageIndex >>> (level * fanoutBits)) & fanoutMask;
      const child = branch.slots[slot];
      assert(child === undefined || child instanceof Branch, 'inner levels of the page tree hold branches');
      const ownedChild = this.owned(child);
      branch.slots[slot] = ownedChild;
      branch = ownedChild;
    }
    return branch;
  }

  private owned(branch: Branch | undefined): Branch {
    if (branch === undefined) return new Branch(this.owner, new Array<Branch | Leaf | undefined>(fanout).fill(undefined));
    if (branch.owner === this.owner) return branch;
    return new Branch(this.owner, branch.slots.slice());
  }

  private checkRange(offsetBytes: number, lengthBytes: number): void {
    assert(Number.isSafeInteger(offsetBytes) && offsetBytes >= 0, 'bad offset', offsetBytes);
    assert(Number.isSafeInteger(lengthBytes) && lengthBytes >= 0, 'bad length', lengthBytes);
    if (offsetBytes + lengthBytes > this.sizeBytes) assert(false, 'range ends past the image end', `${offsetBytes}+${lengthBytes} > ${this.sizeBytes}`);
  }
}

function walk(branch: Branch, level: number, firstPage: number, visit: (pageIndex: number, bytes: Uint8Array) => void): void {
  const span = fanout ** level;
  for (let slot = 0; slot < fanout; slot += 1) {
    const child = branch.slots[slot];
    if (child === undefined) continue;
    const pageIndex = firstPage + slot * span;
    if (child instanceof Leaf) visit(pageIndex, child.bytes);
    else walk(child, level - 1, pageIndex, visit);
  }
}

function diff(mine: Branch | undefined, theirs: Branch | undefined, level: number, firstPage: number, visit: (pageIndex: number) => void): void {
  if (mine === theirs) return;
  const span = fanout ** level;
  for (let slot = 0; slot < fanout; slot += 1) {
    const a = mine?.slots[slot];
    const b = theirs?.slots[slot];
    if (a === b) continue;
    const pageIndex = firstPage + slot * span;
    if (level === 0) {
      visit(pageIndex);
      continue;
    }
    assert(!(a instanceof Leaf) && !(b instanceof Leaf), 'inner levels of the page tree hold branches');
    diff(a, b, level - 1, pageIndex, visit);
  }
}

/** Zeroes [start, end) of `target`, a Buffer or a plain Uint8Array alike. */
function fillZero(target: Uint8Array, start: number, end: number): void {
  Uint8Array.prototype.fill.call(target, 0, start, end);
}

export function isZero(bytes: Uint8Array): boolean {
  // Four bytes at a time where alignment allows; the oracle zero-checks every sector it
  // decodes, so this is on the simulator's hot path.
  let index = 0;
  if (bytes.byteOffset % 4 === 0) {
    const words = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length >>> 2);
    for (let word = 0; word < words.length; word += 1) if (words[word] !== 0) return false;
    index = words.length * 4;
  }
  for (; index < bytes.length; index += 1) if (bytes[index] !== 0) return false;
  return true;
}
