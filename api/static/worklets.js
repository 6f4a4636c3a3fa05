// Audio worklets of the page: the microphone cut into 80 ms frames at 24 kHz, and Moshi's audio
// played through a jitter buffer. Both resample (linearly) when the browser would not open the
// AudioContext at 24 kHz.

const MOSHI_RATE = 24000;
const FRAME = 1920; // 80 ms at 24 kHz: one Moshi frame
const ms = (n) => Math.round(n * MOSHI_RATE / 1000);

class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / MOSHI_RATE; // input samples per output sample
    this.pos = 0; // where the next output sample falls, in input samples past `prev`
    this.prev = 0;
    this.smooth = 0; // a one-pole low-pass ahead of downsampling
    this.alpha = Math.min(1, 2 * Math.PI * 11000 / sampleRate);
    this.frame = new Float32Array(FRAME);
    this.fill = 0;
  }

  push(x) {
    this.frame[this.fill++] = x;
    if (this.fill === FRAME) {
      this.port.postMessage(this.frame, [this.frame.buffer]);
      this.frame = new Float32Array(FRAME);
      this.fill = 0;
    }
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    if (this.step === 1) {
      for (let i = 0; i < input.length; i++) this.push(input[i]);
      return true;
    }
    for (let i = 0; i < input.length; i++) {
      const x = this.step > 1 ? (this.smooth += this.alpha * (input[i] - this.smooth)) : input[i];
      while (this.pos <= 1) { // output samples between prev (0) and x (1)
        this.push(this.prev + (x - this.prev) * this.pos);
        this.pos += this.step;
      }
      this.pos -= 1;
      this.prev = x;
    }
    return true;
  }
}

// Starts playing once `margin` is buffered; an underrun stops it until the margin, grown by a step,
// is buffered again; past margin + `headroom` the oldest audio is dropped, so latency stays bounded
// (what Kyutai's client does).
class Player extends AudioWorkletProcessor {
  constructor() {
    super();
    this.capacity = MOSHI_RATE * 10;
    this.ring = new Float32Array(this.capacity);
    this.written = 0; // samples ever written
    this.read = 0; // fractional read position, in samples ever written
    this.step = MOSHI_RATE / sampleRate;
    this.margin = ms(100);
    this.marginStep = ms(40);
    this.maxMargin = ms(600);
    this.headroom = ms(240);
    this.playing = false;
    this.underruns = 0;
    this.played = 0; // Moshi samples played
    this.dropped = 0;
    this.sinceReport = 0;
    this.port.onmessage = (e) => this.write(e.data);
  }

  buffered() { return this.written - Math.floor(this.read); }

  write(samples) {
    for (let i = 0; i < samples.length; i++) this.ring[(this.written + i) % this.capacity] = samples[i];
    this.written += samples.length;
    const excess = this.buffered() - (this.margin + this.headroom);
    if (excess > 0) {
      this.read += excess;
      this.dropped += excess;
    }
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.buffered() >= this.margin) this.playing = true;
    let i = 0;
    if (this.playing) {
      for (; i < out.length; i++) {
        const at = Math.floor(this.read);
        if (at + 1 >= this.written) { // ran dry
          this.playing = false;
          this.underruns++;
          this.margin = Math.min(this.margin + this.marginStep, this.maxMargin);
          break;
        }
        const frac = this.read - at;
        const a = this.ring[at % this.capacity], b = this.ring[(at + 1) % this.capacity];
        out[i] = a + (b - a) * frac;
        this.read += this.step;
        this.played += this.step;
      }
    }
    out.fill(0, i);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.sinceReport += out.length;
    if (this.sinceReport >= sampleRate / 10) {
      this.sinceReport = 0;
      this.port.postMessage({ bufferedMs: this.buffered() * 1000 / MOSHI_RATE, underruns: this.underruns,
        playedSamples: Math.floor(this.played), droppedSamples: this.dropped,
        marginMs: this.margin * 1000 / MOSHI_RATE, playing: this.playing });
    }
    return true;
  }
}

registerProcessor("capture", Capture);
registerProcessor("player", Player);
