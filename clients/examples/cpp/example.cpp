// A ringlm client in C++: tokenize a text, run a seeded generate, stream the same request, print JSON.
//
//   build/ringlm_example --port 9090 --text "Hello" [--max-tokens 16 --temperature 0.8 --seed 7]
//                        [--tls --ca ca.pem --cert client.pem --key client.key] [--token TOKEN]
//
// Generator.h and ringlm_types.h are generated from idl/ringlm.thrift by `make clients`; the token may also
// come from RINGLM_AUTH_TOKEN, so that it need not show in the process list.

#include <cstdlib>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/transport/TBufferTransports.h>
#include <thrift/transport/TSSLSocket.h>
#include <thrift/transport/TSocket.h>

#include "Generator.h"

using apache::thrift::TException;
using apache::thrift::protocol::TBinaryProtocol;
using apache::thrift::transport::TFramedTransport;
using apache::thrift::transport::TSocket;
using apache::thrift::transport::TSSLSocketFactory;

namespace {

// JSON string literal; the server's text is UTF-8 already, so only quotes, backslashes and control
// characters need escaping.
std::string quoted(const std::string& text) {
  std::ostringstream out;
  out << '"';
  for (unsigned char c : text) {
    switch (c) {
      case '"': out << "\\\""; break;
      case '\\': out << "\\\\"; break;
      case '\n': out << "\\n"; break;
      case '\r': out << "\\r"; break;
      case '\t': out << "\\t"; break;
      default:
        if (c < 0x20) {
          char escape[8];
          std::snprintf(escape, sizeof escape, "\\u%04x", c);
          out << escape;
        } else {
          out << c;
        }
    }
  }
  out << '"';
  return out.str();
}

std::string array(const std::vector<int32_t>& ids) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < ids.size(); ++i) out << (i ? "," : "") << ids[i];
  out << ']';
  return out.str();
}

// --name value, --name=value (for values that start with a dash) and bare --flags, with defaults.
struct Flags {
  std::map<std::string, std::string> values{{"host", "127.0.0.1"}, {"port", "9090"},
                                            {"text", "The quick brown fox"}, {"max-tokens", "16"},
                                            {"temperature", "0.8"}, {"seed", "7"}};
  bool tls = false;

  Flags(int argc, char** argv) {
    if (const char* token = std::getenv("RINGLM_AUTH_TOKEN")) values["token"] = token;
    for (int i = 1; i < argc; ++i) {
      std::string name = argv[i];
      if (name == "--tls") {
        tls = true;
      } else if (name.rfind("--", 0) == 0 && name.find('=') != std::string::npos) {
        values[name.substr(2, name.find('=') - 2)] = name.substr(name.find('=') + 1);   // --name=-1
      } else if (name.rfind("--", 0) == 0 && i + 1 < argc) {
        values[name.substr(2)] = argv[++i];
      } else {
        throw std::invalid_argument("unexpected argument " + name);
      }
    }
  }
  std::string get(const std::string& name) const {
    auto found = values.find(name);
    return found == values.end() ? "" : found->second;
  }
};

ringlm::GenerateRequest make_request(const Flags& flags) {
  ringlm::SamplingOptions sampling;
  sampling.__set_temperature(std::stod(flags.get("temperature")));
  sampling.__set_seed(std::stoll(flags.get("seed")));
  ringlm::GenerateRequest request;
  // __set_ marks an optional field as present; assigning the member alone would not send it.
  request.__set_prompt(flags.get("text"));
  request.__set_max_tokens(std::stoi(flags.get("max-tokens")));
  request.__set_sampling(sampling);
  return request;
}

std::shared_ptr<TSocket> open_socket(const Flags& flags) {
  const int port = std::stoi(flags.get("port"));
  std::shared_ptr<TSocket> socket;
  if (flags.tls) {
    auto factory = std::make_shared<TSSLSocketFactory>();
    if (!flags.get("ca").empty()) factory->loadTrustedCertificates(flags.get("ca").c_str());
    if (!flags.get("cert").empty()) {
      factory->loadCertificate(flags.get("cert").c_str());
      factory->loadPrivateKey(flags.get("key").c_str());
    }
    factory->authenticate(true);   // verify the server's certificate (and its name or IP)
    socket = factory->createSocket(flags.get("host"), port);
  } else {
    socket = std::make_shared<TSocket>(flags.get("host"), port);
  }
  socket->setConnTimeout(10000);
  socket->setRecvTimeout(60000);   // longer than next_chunk's 1 s long poll and a generate on a busy server
  return socket;
}

int run(const Flags& flags) {
  // ringlm speaks the framed transport with the strict binary protocol, in TLS or not.
  auto transport = std::make_shared<TFramedTransport>(open_socket(flags));
  ringlm::GeneratorClient client(std::make_shared<TBinaryProtocol>(transport));
  transport->open();
  if (!flags.get("token").empty()) client.authenticate(flags.get("token"));

  std::vector<int32_t> text_ids;
  client.tokenize(text_ids, flags.get("text"), true, false);
  ringlm::GenerateResult result;
  client.generate(result, make_request(flags));

  // The same seeded request, streamed: next_chunk long-polls until the last chunk (done) brings the result.
  std::string stream_id;
  client.open_stream(stream_id, make_request(flags));
  std::string streamed;
  ringlm::StreamChunk chunk;
  do {
    client.next_chunk(chunk, stream_id, 1000);
    streamed += chunk.text;
  } while (!chunk.done);
  transport->close();

  std::cout << "{\"text_ids\":" << array(text_ids) << ",\"generate\":{\"token_ids\":" << array(result.token_ids)
            << ",\"text\":" << quoted(result.text) << "},\"stream\":{\"text\":" << quoted(streamed)
            << ",\"token_ids\":" << array(chunk.result.token_ids) << "}}" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // The IDL's exceptions are generated classes deriving from TException: catch them before it.
  try {
    return run(Flags(argc, argv));
  } catch (const ringlm::InvalidRequest& e) {
    std::cout << "{\"error\":\"InvalidRequest\",\"field\":" << quoted(e.field) << ",\"message\":"
              << quoted(e.message) << "}" << std::endl;
  } catch (const ringlm::Overloaded& e) {
    std::cout << "{\"error\":\"Overloaded\",\"message\":" << quoted(e.message) << ",\"retry_after_ms\":"
              << e.retry_after_ms << ",\"draining\":" << (e.draining ? "true" : "false") << "}" << std::endl;
  } catch (const ringlm::Unauthorized& e) {
    std::cout << "{\"error\":\"Unauthorized\",\"message\":" << quoted(e.message) << "}" << std::endl;
  } catch (const ringlm::ModelError& e) {
    std::cout << "{\"error\":\"ModelError\",\"message\":" << quoted(e.message) << "}" << std::endl;
  } catch (const ringlm::DeadlineExceeded& e) {
    std::cout << "{\"error\":\"DeadlineExceeded\",\"message\":" << quoted(e.message) << "}" << std::endl;
  } catch (const ringlm::Cancelled& e) {
    std::cout << "{\"error\":\"Cancelled\",\"message\":" << quoted(e.message) << "}" << std::endl;
  } catch (const TException& e) {
    std::cout << "{\"error\":\"TransportError\",\"message\":" << quoted(e.what()) << "}" << std::endl;
  } catch (const std::exception& e) {   // a malformed flag (std::stoi and friends)
    std::cout << "{\"error\":\"UsageError\",\"message\":" << quoted(e.what()) << "}" << std::endl;
  }
  return 1;
}
